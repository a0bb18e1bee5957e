"""Callbacks that calibrate, reallocate ranks, truncate, quantize and recover (U/V LoRA), at the start of fit."""

from callbacks.calibration import WhiteningCollection
from callbacks.lora import UVLoRA
from callbacks.pretrained import SavePretrained
from callbacks.projector import ProjectorInputNormalization
from callbacks.quantization import Quantization
from callbacks.reallocation import RankReallocation
from callbacks.sequential import SequentialCompression
from callbacks.truncation import SVDTruncation

__all__ = [
    "ProjectorInputNormalization",
    "Quantization",
    "RankReallocation",
    "SVDTruncation",
    "SavePretrained",
    "SequentialCompression",
    "UVLoRA",
    "WhiteningCollection",
]
