"""VQA data: ScienceQA-IMG and VizWiz readers (official formats), synthetic fixture sets, a DataModule.

Public names are imported lazily so that importing one reader does not pull in Lightning.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "VQACollator": "data.vqa.common",
    "VQADataModule": "data.vqa.datamodule",
    "VQAMixDataModule": "data.vqa.mix",
    "labelled_root": "data.vqa.labelled",
    "write_labelled": "data.vqa.labelled",
    "VQAExample": "data.vqa.common",
    "read_scienceqa": "data.vqa.scienceqa",
    "read_vizwiz": "data.vqa.vizwiz",
    "scienceqa_prompt": "data.vqa.scienceqa",
    "synthetic_root": "data.vqa.synthetic",
    "vizwiz_prompt": "data.vqa.vizwiz",
    "write_scienceqa": "data.vqa.synthetic",
    "write_vizwiz": "data.vqa.synthetic",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'data.vqa' has no attribute {name!r}")
