"""Callbacks that calibrate, reallocate ranks, truncate and recover (alternating U/V LoRA), at the start of fit."""

from callbacks.calibration import WhiteningCollection
from callbacks.lora import UVLoRA
from callbacks.reallocation import RankReallocation
from callbacks.truncation import SVDTruncation

__all__ = ["RankReallocation", "SVDTruncation", "UVLoRA", "WhiteningCollection"]
