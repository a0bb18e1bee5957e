"""Multi-view geometry data: procedural scenes, CO3Dv2 / ETH3D / DTU loaders, a DataModule.

All sources yield the same sample dict (OpenCV cameras, z-depth, world points); see
:mod:`data.multiview.common` and :mod:`data.multiview.geometry` for the conventions.
Public names are imported lazily so that ``data.multiview.geometry`` stays light.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "CO3DDataset": "data.multiview.co3d",
    "DTUDataset": "data.multiview.dtu",
    "ETH3DDataset": "data.multiview.eth3d",
    "MultiViewDataModule": "data.multiview.datamodule",
    "SyntheticMultiViewDataset": "data.multiview.synthetic",
    "render_sample": "data.multiview.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data.multiview' has no attribute {name!r}")
