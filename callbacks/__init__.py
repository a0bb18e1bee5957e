"""Callbacks that calibrate, reallocate ranks, truncate and (later) recover, at the start of fit."""

from callbacks.calibration import WhiteningCollection
from callbacks.reallocation import RankReallocation
from callbacks.truncation import SVDTruncation

__all__ = ["RankReallocation", "SVDTruncation", "WhiteningCollection"]
