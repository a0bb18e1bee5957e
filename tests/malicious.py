"""Files whose unpickling runs code: to check that no load path of ours unpickles a user's file.

The payload is a ``__reduce__`` that calls ``builtins.open(marker, "w")`` -- harmless, but it
creates ``marker`` the moment a plain (unsafe) unpickler rebuilds it, exactly as a real attack's
``os.system(...)`` would run.  A load path is safe when it raises *and* ``marker`` does not exist.

- :func:`malicious_checkpoint`: a ``torch.save`` zip file shaped like a Lightning checkpoint
  (``state_dict`` of tensors, ``compression_plan``, ...) with the payload among its entries;
- :func:`malicious_pickle`: a bare pickle (what an old ``.pt``, a ``.pkl`` or a file renamed
  to ``.safetensors`` / ``.json`` could hold).

Usage::

    from tests.malicious import malicious_checkpoint
    ckpt, marker = malicious_checkpoint(tmp_path / "evil.ckpt")
    with pytest.raises(ValueError, match="refusing"):
        load_something(ckpt)
    assert not marker.exists()
"""

from __future__ import annotations

import builtins
import pickle
from pathlib import Path

import torch


class Payload:
    """Unpickles to ``open(marker, "w")``: creates ``marker`` (see module docstring)."""

    def __init__(self, marker: str | Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return builtins.open, (self.marker, "w")


def default_marker(path: Path) -> Path:
    return path.parent / f"{path.name}.PWNED"


def malicious_checkpoint(path: str | Path, marker: str | Path | None = None) -> tuple[Path, Path]:
    """Write a Lightning-shaped ``torch.save`` checkpoint carrying the payload; returns ``(path, marker)``."""
    path = Path(path)
    marker = Path(marker) if marker is not None else default_marker(path)
    checkpoint = {
        "epoch": 0,
        "global_step": 1,
        "pytorch-lightning_version": "2.5.0",
        "state_dict": {"model.layer.weight": torch.ones(2, 2)},
        "compression_plan": {"format": "svd-vggt/plan", "version": 1, "layers": {}},
        "hyper_parameters": {"payload": Payload(marker)},
    }
    torch.save(checkpoint, path)
    return path, marker


def malicious_pickle(path: str | Path, marker: str | Path | None = None) -> tuple[Path, Path]:
    """Write a bare pickle of the payload (protocol 2); returns ``(path, marker)``."""
    path = Path(path)
    marker = Path(marker) if marker is not None else default_marker(path)
    path.write_bytes(pickle.dumps({"state_dict": Payload(marker)}, protocol=2))
    return path, marker
