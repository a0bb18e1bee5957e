"""Real labelled images for plain ViT encoders: Fashion-MNIST and OpenCV's handwritten digits.

Sources (Debian packages, not in git):

- Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``): ``/usr/share/datasets/fashion-mnist/
  {train,t10k}-{images-idx3,labels-idx1}-ubyte.gz``, 60 000 + 10 000 28x28 grey images, 10 classes.
  IDX format: big-endian, magic ``0x0000 <dtype> <ndim>`` then ``ndim`` int32 sizes, then the data.
- OpenCV digits (``apt-get install -y opencv-doc``): ``/usr/share/doc/opencv-doc/examples/data/digits.png``,
  a 1000x2000 grey sheet of 50 x 100 cells of 20x20 px; row-major, digit ``d`` fills cell rows
  ``5d .. 5d + 4`` (500 images per digit), as OpenCV's ``digits.py`` reads it.

Splits are disjoint per dataset, from one seeded permutation of each pool: **calibration**
(compression statistics, labels unused), **train** (unlabelled feature distillation for recovery),
**probe** (the labelled set a k-NN / linear probe is fit on), **val** (feature fidelity during
recovery) and **test** (scoring).  Fashion-MNIST's test split comes from its own ``t10k`` file, every
other split from ``train``; the digits have one pool.  No image is used for two purposes.

Batches: ``{"images": float [B, 1, S, S] in [0, 1], "labels": int64 [B], "probe_train": bool [B]}``
(grey, resized bilinearly from 28 or 20 px to ``S = image_size``; :class:`models.vit.VisionEncoder`
repeats the channel).  A scoring loader yields the probe batches (``probe_train`` True) then the
test batches; calibration batches also carry ``probe_seed`` (int64 ``[B]``, see
:meth:`ImageProbeDataModule.calibration_dataloader`).
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

log = logging.getLogger(__name__)

FASHION_ROOT = Path("/usr/share/datasets/fashion-mnist")
FASHION_INSTALL = "apt-get install -y dataset-fashion-mnist"
DIGITS_PNG = Path("/usr/share/doc/opencv-doc/examples/data/digits.png")
DIGITS_INSTALL = "apt-get install -y opencv-doc"
DATASETS = ("fashion_mnist", "digits")
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An IDX file (optionally gzip-compressed) as a numpy array of its declared dtype and shape."""
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path} is not an IDX file (magic {raw[:4].hex()})")
    ndim = raw[3]
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    offset = 4 + 4 * ndim
    if len(raw) - offset != int(np.prod(dims)) * dtype.itemsize:
        raise ValueError(f"{path}: header says {dims} x {dtype}, file holds {len(raw) - offset} bytes of data")
    return np.frombuffer(raw, dtype=dtype, offset=offset).reshape(dims)


def load_fashion_mnist(split: str = "train", root: str | os.PathLike | None = None) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [N, 28, 28], labels int64 [N])`` of the ``train`` or ``test`` (t10k) split."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    root = Path(root) if root is not None else FASHION_ROOT
    prefix = "train" if split == "train" else "t10k"
    images, labels = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        raise FileNotFoundError(f"Fashion-MNIST is not at {root} (expected {images.name}, {labels.name}): run "
                                f"`{FASHION_INSTALL}` (as root) or pass the folder holding the idx gzip files")
    x, y = read_idx(images), read_idx(labels)
    if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
        raise ValueError(f"{root}: images {x.shape} and labels {y.shape} do not pair up")
    return x, y.astype(np.int64)


def load_digits(path: str | os.PathLike | None = None, cell: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """``(images uint8 [5000, 20, 20], labels int64 [5000])`` cut from OpenCV's ``digits.png`` (docstring)."""
    from PIL import Image

    path = Path(path) if path is not None else DIGITS_PNG
    if not path.is_file():
        raise FileNotFoundError(f"OpenCV's digits.png is not at {path}: run `{DIGITS_INSTALL}` (as root) or pass "
                                "its path")
    sheet = np.asarray(Image.open(path).convert("L"))
    rows, cols = sheet.shape[0] // cell, sheet.shape[1] // cell
    if sheet.shape != (rows * cell, cols * cell) or rows % 10:
        raise ValueError(f"{path}: a {sheet.shape} sheet is not 10 equal bands of {cell}x{cell} cells")
    cells = sheet.reshape(rows, cell, cols, cell).transpose(0, 2, 1, 3).reshape(rows * cols, cell, cell)
    labels = np.repeat(np.arange(10), rows * cols // 10)
    return np.ascontiguousarray(cells), labels.astype(np.int64)


class ImageSet(Dataset):
    """uint8 images + labels; items are ``(image uint8 [h, w], label, probe_train)``."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, probe_train: bool = False) -> None:
        self.images, self.labels, self.probe_train = torch.from_numpy(np.ascontiguousarray(images)), labels, probe_train

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int):
        return self.images[i], int(self.labels[i]), self.probe_train


def collate(items, image_size: int) -> dict[str, torch.Tensor]:
    """Scale to [0, 1], resize (bilinear) to ``image_size`` and stack (a calibration batch mixes 28 and 20 px)."""
    resized = []
    for image, *_ in items:
        x = image[None, None].float() / 255.0
        if tuple(x.shape[-2:]) != (image_size, image_size):
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        resized.append(x)
    images = torch.cat(resized)
    return {"images": images.clamp(0, 1), "labels": torch.tensor([it[1] for it in items]),
            "probe_train": torch.tensor([it[2] for it in items])}


class _Indexed(Dataset):
    """Items of ``data`` with their index appended."""

    def __init__(self, data: Dataset) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int):
        return (*self.data[i], i)


def collate_indexed(items, image_size: int) -> dict[str, torch.Tensor]:
    """:func:`collate` plus ``probe_seed`` (int64 ``[B]``) from the appended indices."""
    out = collate([it[:-1] for it in items], image_size)
    out["probe_seed"] = torch.tensor([it[-1] for it in items], dtype=torch.int64)
    return out


def split_sizes_fit(pool: int, sizes: dict[str, int], name: str) -> None:
    if sum(sizes.values()) > pool:
        raise ValueError(f"{name}: the splits {sizes} need {sum(sizes.values())} images, the pool has {pool}")


class ImageProbeDataModule(LightningDataModule):
    """Disjoint calibration / train / probe / val / test splits of real labelled images (module docstring).

    Args:
        datasets: names among ``fashion_mnist``, ``digits``; the first one also serves ``train`` and ``val``.
        image_size: side the images are resized to (a multiple of the ViT's patch size: 112 = 8 x 14 = 7 x 16).
        calibration_images: per dataset, for the compression statistics (labels unused).
        train_images: unlabelled images for feature-distillation recovery (first dataset).
        probe_images: per dataset, the labelled set the k-NN / linear probe is fit on.
        val_images: first dataset, feature fidelity to the dense model during recovery.
        test_images: per dataset, scored.
        batch_size: images per batch.
        seed: seeds the split permutations and the train shuffling.
        fashion_root: folder of the Fashion-MNIST idx gzip files (default: the Debian package's).
        digits_path: OpenCV's ``digits.png`` (default: the ``opencv-doc`` package's).
    """

    def __init__(self, datasets: Sequence[str] = DATASETS, image_size: int = 112, calibration_images: int = 128,
                 train_images: int = 2000, probe_images: int = 1000, val_images: int = 128, test_images: int = 1000,
                 batch_size: int = 32, seed: int = 0, fashion_root: str | None = None,
                 digits_path: str | None = None) -> None:
        super().__init__()
        unknown = [d for d in datasets if d not in DATASETS]
        if not datasets or unknown:
            raise ValueError(f"datasets must be a non-empty list among {DATASETS}, got {list(datasets)}")
        if min(calibration_images, train_images, probe_images, val_images, test_images) < 0 or batch_size < 1:
            raise ValueError("split sizes must be >= 0 and batch_size >= 1")
        if image_size < 14:
            raise ValueError(f"image_size must be at least one 14 px patch, got {image_size}")
        self.datasets = list(datasets)
        self.image_size = image_size
        self.sizes = {"calibration": calibration_images, "train": train_images, "probe": probe_images,
                      "val": val_images, "test": test_images}
        self.batch_size, self.seed = batch_size, seed
        self.fashion_root, self.digits_path = fashion_root, digits_path
        self.splits: dict[str, dict[str, ImageSet]] = {}

    @property
    def test_names(self) -> list[str]:
        return list(self.datasets)

    def _split(self, name: str, first: bool) -> dict[str, ImageSet]:
        sizes = {k: v for k, v in self.sizes.items() if first or k not in ("train", "val")}
        rng = np.random.default_rng([self.seed, DATASETS.index(name)])
        if name == "fashion_mnist":
            x, y = load_fashion_mnist("train", self.fashion_root)
            tx, ty = load_fashion_mnist("test", self.fashion_root)
            test_idx = rng.permutation(len(tx))[: sizes.pop("test")]
            out = {"test": ImageSet(tx[test_idx], ty[test_idx])}
        else:
            x, y = load_digits(self.digits_path)
            out = {}
        split_sizes_fit(len(x), sizes, name)
        order, start = rng.permutation(len(x)), 0
        for split, n in sizes.items():
            idx = order[start: start + n]
            out[split] = ImageSet(x[idx], y[idx], probe_train=split == "probe")
            start += n
        return out

    def setup(self, stage: str | None = None) -> None:
        if not self.splits:
            self.splits = {name: self._split(name, i == 0) for i, name in enumerate(self.datasets)}

    def _loader(self, dataset: Dataset, shuffle: bool = False) -> DataLoader:
        shuffle = shuffle and len(dataset) > 0  # compression-only runs have no training images
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(dataset, batch_size=self.batch_size, shuffle=shuffle, generator=g if shuffle else None,
                          collate_fn=functools.partial(collate, image_size=self.image_size))

    def _concat(self, parts: list[ImageSet]) -> Dataset:
        return torch.utils.data.ConcatDataset([p for p in parts if len(p)])

    def calibration_dataloader(self) -> DataLoader:
        """Fixed order: each dataset's calibration images, one dataset after the other; each batch also carries
        ``probe_seed`` (int64 ``[B]``, the image's position in this loader), which the ViT spec's gradient
        importance draws its output probes from (:class:`lightning_modules.vit_spec.ViTSpec`)."""
        self.setup()
        data = self._concat([s["calibration"] for s in self.splits.values()])
        return DataLoader(_Indexed(data), batch_size=self.batch_size, shuffle=False,
                          collate_fn=functools.partial(collate_indexed, image_size=self.image_size))

    def train_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits[self.datasets[0]]["train"], shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self.setup()
        return self._loader(self.splits[self.datasets[0]]["val"])

    def scoring_dataloader(self, name: str) -> DataLoader:
        """Probe batches (``probe_train`` True) then test batches of one dataset."""
        self.setup()
        return self._loader(self._concat([self.splits[name]["probe"], self.splits[name]["test"]]))

    def test_dataloader(self) -> list[DataLoader]:
        return [self.scoring_dataloader(name) for name in self.datasets]
