"""Atomic file writes: a temporary file in the target's folder, fsync, then ``os.replace``.

Used for every artefact the project writes (plans, checkpoints, token caches, exports), so
an interrupted run leaves the previous file or nothing -- never a truncated one.
"""

from __future__ import annotations

import os
import pickle
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import torch


def atomic_write(path: str | os.PathLike, write: Callable[[IO[bytes]], Any]) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write(path, lambda f: f.write(text.encode()))


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    return atomic_write(path, lambda f: torch.save(obj, f))


def safe_torch_load(path: str | os.PathLike, mmap: bool = False, map_location: Any = "cpu") -> Any:
    """``torch.load`` that never runs code from the file (``weights_only=True``).

    A file whose pickle names anything but tensors and plain containers is refused with an error
    naming the file (never retried unsafely); a missing or unreadable file says so.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {path} does not exist (or is not a file)")
    try:
        try:
            return torch.load(path, map_location=map_location, mmap=mmap, weights_only=True)
        except RuntimeError as err:
            if not (mmap and "mmap" in str(err)):
                raise
            return torch.load(path, map_location=map_location, weights_only=True)  # a legacy (non-zip) file
    except pickle.UnpicklingError as err:
        raise ValueError(
            f"refusing to load {path}: it holds more than tensors and plain data (weights_only=True rejected "
            f"it: {str(err).splitlines()[0]}). Checkpoints written by this project never need that; a file "
            "from elsewhere may run code when unpickled"
        ) from None
    except (RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"cannot read checkpoint {path}: {err}") from None
