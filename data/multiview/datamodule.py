"""LightningDataModule for multi-view geometry: synthetic scenes or CO3Dv2 / ETH3D / DTU folders.

Batches are dicts (default collation of the samples of :mod:`data.multiview.common`):
``images [B,S,3,H,W]`` in [0, 1], ``depths [B,S,H,W]``, ``masks [B,S,H,W]`` bool,
``world_points [B,S,H,W,3]``, ``extrinsics [B,S,3,4]`` (OpenCV camera-from-world),
``intrinsics [B,S,3,3]`` (pixels) and ``scene`` (list of B strings).

Splits: synthetic scenes are seeded per split (train / val / test / calibration use
different split ids, hence disjoint scenes).  For folders, the available scenes (sorted)
are shuffled with ``seed`` and cut into consecutive train / val / test blocks of the
requested sizes; the calibration set is the first ``calibration_scenes`` training scenes.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Literal

import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.multiview.co3d import CO3DDataset
from data.multiview.common import check_image_size, check_num_views
from data.multiview.dtu import DTUDataset
from data.multiview.eth3d import ETH3DDataset
from data.multiview.synthetic import SyntheticMultiViewDataset

log = logging.getLogger(__name__)

Source = Literal["synthetic", "co3d", "eth3d", "dtu"]
_SPLIT_IDS = {"train": 0, "val": 1, "test": 2, "calibration": 3}


class MultiViewDataModule(LightningDataModule):
    """Multi-view batches for VGGT calibration, LoRA recovery and evaluation.

    Args:
        source: ``"synthetic"`` (procedural, no files) or a dataset format
            ``"co3d"`` / ``"eth3d"`` / ``"dtu"`` read from ``root``.
        root: dataset root folder (required unless ``source="synthetic"``).
        num_views: views per sample (S).
        image_size: ``(H, W)`` of every view, multiples of 14.
        train_scenes: scenes in the training split.
        val_scenes: scenes in the validation split.
        test_scenes: scenes in the test split.
        calibration_scenes: scenes in the calibration set (activation statistics).
        seed: seed of the synthetic scenes, the folder split and random frame selection.
        batch_size: samples per batch (B).
        num_workers: DataLoader worker processes.
        frame_selection: ``"uniform"`` or ``"random"`` choice of the S frames of a folder scene.
        categories: CO3D categories to use (``None`` = all found).
        min_views: synthetic training scenes have between ``min_views`` and ``num_views`` views each
            (uniform, seeded per scene; e.g. 2 so that two-view pose is learned); needs ``batch_size: 1``.
            Validation, test and calibration keep ``num_views``.  ``None`` = ``num_views`` everywhere.
    """

    def __init__(
        self,
        source: Source = "synthetic",
        root: str | None = None,
        num_views: int = 8,
        image_size: tuple[int, int] = (112, 112),
        train_scenes: int = 64,
        val_scenes: int = 8,
        test_scenes: int = 8,
        calibration_scenes: int = 8,
        seed: int = 0,
        batch_size: int = 1,
        num_workers: int = 0,
        frame_selection: Literal["uniform", "random"] = "uniform",
        categories: list[str] | None = None,
        min_views: int | None = None,
    ) -> None:
        super().__init__()
        if source not in ("synthetic", "co3d", "eth3d", "dtu"):
            raise ValueError(f"source must be 'synthetic', 'co3d', 'eth3d' or 'dtu', got {source!r}")
        if source != "synthetic" and root is None:
            raise ValueError(f"source={source!r} reads files: pass root=<path to the {source} dataset>")
        if source != "synthetic" and not Path(root).expanduser().is_dir():
            raise FileNotFoundError(f"root={root!r} is not a folder; point it at the {source} dataset")
        num_views = check_num_views(num_views)
        if min_views is not None:
            if source != "synthetic":
                raise ValueError("min_views (a view count per scene) is implemented for source='synthetic' only")
            if check_num_views(min_views) > num_views:
                raise ValueError(f"min_views={min_views} exceeds num_views={num_views}")
            if batch_size != 1 and min_views < num_views:
                raise ValueError(f"min_views={min_views} < num_views={num_views} gives samples of different view "
                                 f"counts, which cannot be stacked: set batch_size: 1 (got {batch_size})")
        if min(train_scenes, val_scenes, test_scenes, calibration_scenes) < 0 or batch_size < 1:
            raise ValueError("scene counts must be >= 0 and batch_size >= 1")
        self.save_hyperparameters()
        self.source, self.root = source, root
        self.num_views, self.image_size = num_views, check_image_size(image_size)
        self.split_sizes = {
            "train": train_scenes,
            "val": val_scenes,
            "test": test_scenes,
            "calibration": calibration_scenes,
        }
        self.seed, self.batch_size, self.num_workers = seed, batch_size, num_workers
        self.frame_selection, self.categories = frame_selection, categories
        self.min_views = min_views
        self._datasets: dict[str, Dataset] = {}

    # ----------------------------------------------------------------- datasets
    def _folder_splits(self) -> dict[str, list[str]]:
        if self.source == "co3d":
            names = CO3DDataset.available_scenes(self.root, self.categories)
        elif self.source == "eth3d":
            names = ETH3DDataset.available_scenes(self.root)
        else:
            names = DTUDataset.available_scenes(self.root)
        order = torch.randperm(len(names), generator=torch.Generator().manual_seed(self.seed)).tolist()
        names = [names[i] for i in order]
        splits, start = {}, 0
        for split in ("train", "val", "test"):
            splits[split] = names[start : start + self.split_sizes[split]]
            start += len(splits[split])
        if start < sum(self.split_sizes[s] for s in ("train", "val", "test")):
            log.warning(
                "%s at %s has %d scenes; splits got %s",
                self.source,
                self.root,
                len(names),
                {k: len(v) for k, v in splits.items()},
            )
        splits["calibration"] = splits["train"][: self.split_sizes["calibration"]]
        return splits

    def _build(self, split: str, scene_names: list[str] | None) -> Dataset:
        common = {"num_views": self.num_views, "image_size": self.image_size, "seed": self.seed}
        if self.source == "synthetic":
            min_views = self.min_views if split == "train" else None
            return SyntheticMultiViewDataset(num_scenes=self.split_sizes[split], split_id=_SPLIT_IDS[split],
                                             min_views=min_views, **common)
        if not scene_names:
            raise ValueError(
                f"the {split} split of {self.source} at {self.root} is empty; raise "
                f"{split}_scenes or check the dataset root"
            )
        common["frame_selection"] = self.frame_selection
        if self.source == "co3d":
            return CO3DDataset(self.root, categories=self.categories, sequences=scene_names, **common)
        if self.source == "eth3d":
            return ETH3DDataset(self.root, scenes=scene_names, **common)
        return DTUDataset(self.root, scans=scene_names, **common)

    def dataset(self, split: Literal["train", "val", "test", "calibration"]) -> Dataset:
        """The dataset of ``split`` (built on first use)."""
        if split not in _SPLIT_IDS:
            raise ValueError(f"split must be one of {sorted(_SPLIT_IDS)}, got {split!r}")
        if split not in self._datasets:
            if self.split_sizes[split] == 0:
                raise ValueError(f"{split}_scenes is 0; set it > 0 to use the {split} split")
            names = None if self.source == "synthetic" else self._folder_splits()[split]
            self._datasets[split] = self._build(split, names)
        return self._datasets[split]

    def setup(self, stage: str | None = None) -> None:
        """Build the datasets needed for ``stage`` (``fit`` / ``validate`` / ``test`` / ``predict``)."""
        wanted = {"fit": ("train", "val"), "validate": ("val",), "test": ("test",), "predict": ("test",)}
        for split in wanted.get(stage, ("train", "val", "test")) if stage else ("train", "val", "test"):
            if self.split_sizes[split] > 0:
                self.dataset(split)

    # -------------------------------------------------------------- dataloaders
    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(
            self.dataset(split),
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            generator=generator,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False)

    def calibration_dataloader(self) -> DataLoader:
        """Fixed-order loader over the calibration scenes (activation statistics for compression)."""
        return self._loader("calibration", shuffle=False)
