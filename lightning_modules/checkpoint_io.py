"""Atomic, safe checkpoints: write to a temporary file beside the target, fsync, rename; load
with ``weights_only=True`` only.

A crash or a full disk mid-write leaves the previous checkpoint intact instead of a truncated file
that fails to load on resume; a checkpoint whose pickle would run code is refused, whatever
``--weights_only`` says.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from compression.io import atomic_torch_save, safe_torch_load


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin whose saves are atomic and whose loads never unpickle code."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: str | os.PathLike, map_location: Callable | None = None,
                        weights_only: bool | None = None) -> dict[str, Any]:
        if weights_only is False:
            raise ValueError(f"refusing to load {path} with weights_only=False: unpickling may run code from the "
                             "file; this project's checkpoints load with weights_only=True")
        return safe_torch_load(path, map_location=map_location or "cpu")
