"""Atomic checkpoints: write to a temporary file beside the target, fsync, then rename.

A crash or a full disk mid-write leaves the previous checkpoint intact instead of a
truncated file that fails to load on resume.
"""

from __future__ import annotations

import os
from typing import Any

from lightning.fabric.plugins import TorchCheckpointIO

from compression.io import atomic_torch_save


class AtomicCheckpointIO(TorchCheckpointIO):
    """Lightning ``CheckpointIO`` plugin whose saves are atomic (local paths)."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: str | os.PathLike, storage_options: Any = None) -> None:
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO takes no storage_options")
        atomic_torch_save(checkpoint, path)
