"""Image datasets (IDX gzip, OpenCV digits sheet), disjoint splits, and the probe metrics."""

from __future__ import annotations

import gzip
import struct

import numpy as np
import pytest
import torch

from data.images import ImageProbeDataModule, load_digits, load_fashion_mnist, read_idx
from metrics.probe import FeatureProbe, knn_accuracy, linear_probe_accuracy


def write_idx(path, array: np.ndarray) -> None:
    """IDX as the MNIST page specifies: 0x0000, type 0x08 (uint8), ndim, big-endian int32 sizes, data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">i", d) for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def write_fashion(root, n_train: int = 300, n_test: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Tiny Fashion-MNIST files; every image's first pixel stores its index (to check disjointness)."""
    g = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    out = []
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = g.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        images[:, 0, 0], images[:, 0, 1] = np.arange(n) % 256, np.arange(n) // 256
        labels = g.integers(0, 10, n, dtype=np.uint8)
        write_idx(root / f"{prefix}-images-idx3-ubyte.gz", images)
        write_idx(root / f"{prefix}-labels-idx1-ubyte.gz", labels)
        out.append((images, labels))
    return out[0], out[1]


def write_digits(path, rows_per_digit: int = 2, cols: int = 10) -> np.ndarray:
    """A digits.png-style sheet: 10 bands of ``rows_per_digit`` rows of ``cols`` 20x20 cells; a cell in row ``r``,
    column ``c`` is filled with ``20 * digit + c`` except pixel (1, 1) = ``r`` (so every cell is unique)."""
    from PIL import Image

    rows = 10 * rows_per_digit
    sheet = np.zeros((rows * 20, cols * 20), np.uint8)
    for r in range(rows):
        for c in range(cols):
            sheet[r * 20:(r + 1) * 20, c * 20:(c + 1) * 20] = 20 * (r // rows_per_digit) + c
            sheet[r * 20 + 1, c * 20 + 1] = r
    Image.fromarray(sheet).save(path)
    return sheet


def test_read_idx_round_trip_and_errors(tmp_path) -> None:
    a = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "a.gz", a)
    np.testing.assert_array_equal(read_idx(tmp_path / "a.gz"), a)
    (tmp_path / "bad").write_bytes(b"\x01\x02\x03\x04")
    with pytest.raises(ValueError, match="not an IDX file"):
        read_idx(tmp_path / "bad")
    with gzip.open(tmp_path / "short.gz", "wb") as f:
        f.write(bytes([0, 0, 8, 1]) + struct.pack(">i", 10) + b"\x00" * 3)
    with pytest.raises(ValueError, match="header says"):
        read_idx(tmp_path / "short.gz")


def test_fashion_and_digits_readers(tmp_path) -> None:
    (train, labels), _ = write_fashion(tmp_path / "fm")
    x, y = load_fashion_mnist("train", tmp_path / "fm")
    np.testing.assert_array_equal(x, train)
    np.testing.assert_array_equal(y, labels)
    assert y.dtype == np.int64
    write_digits(tmp_path / "digits.png")
    cells, digits = load_digits(tmp_path / "digits.png")
    assert cells.shape == (200, 20, 20)
    np.testing.assert_array_equal(digits, np.repeat(np.arange(10), 20))
    # cell i sits at row i // 10, column i % 10 and holds 20 * digit + column
    np.testing.assert_array_equal(cells[:, 0, 0], 20 * digits + np.arange(200) % 10)
    np.testing.assert_array_equal(cells[:, 1, 1], np.arange(200) // 10)


def test_missing_packages_name_the_apt_command(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y dataset-fashion-mnist"):
        load_fashion_mnist("train", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match=r"apt-get install -y opencv-doc"):
        load_digits(tmp_path / "nowhere.png")


def test_splits_are_disjoint_and_batches_well_formed(tmp_path) -> None:
    write_fashion(tmp_path / "fm")
    write_digits(tmp_path / "digits.png")
    dm = ImageProbeDataModule(image_size=28, calibration_images=20, train_images=50, probe_images=40, val_images=10,
                              test_images=30, batch_size=16, fashion_root=str(tmp_path / "fm"),
                              digits_path=str(tmp_path / "digits.png"))
    dm.setup()
    fm = dm.splits["fashion_mnist"]
    ids = {k: set((s.images[:, 0, 0].int() + 256 * s.images[:, 0, 1].int()).tolist()) for k, s in fm.items()}
    pooled = [k for k in ids if k != "test"]  # the test split comes from t10k, the others from train
    assert sum(len(ids[k]) for k in pooled) == len(set().union(*(ids[k] for k in pooled))) == 20 + 50 + 40 + 10
    assert {k: len(v) for k, v in dm.splits["digits"].items()} == {"calibration": 20, "probe": 40, "test": 30}
    cells = [set(map(bytes, s.images.numpy())) for s in dm.splits["digits"].values()]
    assert sum(map(len, cells)) == len(set().union(*cells)) == 90  # no cell in two splits
    calib = list(dm.calibration_dataloader())
    assert sum(len(b["images"]) for b in calib) == 40
    assert torch.equal(torch.cat([b["probe_seed"] for b in calib]), torch.arange(40))
    loaders = dm.test_dataloader()
    assert dm.test_names == ["fashion_mnist", "digits"] and len(loaders) == 2
    batches = list(loaders[0])
    flags = torch.cat([b["probe_train"] for b in batches])
    assert flags[:40].all() and not flags[40:].any() and len(flags) == 70
    b = batches[0]
    assert b["images"].shape == (16, 1, 28, 28) and b["images"].dtype == torch.float32
    assert 0 <= float(b["images"].min()) and float(b["images"].max()) <= 1 and b["labels"].dtype == torch.int64
    resized = ImageProbeDataModule(image_size=56, fashion_root=str(tmp_path / "fm"), datasets=["fashion_mnist"],
                                   calibration_images=4, train_images=4, probe_images=4, val_images=4, test_images=4)
    assert next(iter(resized.calibration_dataloader()))["images"].shape == (4, 1, 56, 56)
    with pytest.raises(ValueError, match="need"):
        ImageProbeDataModule(datasets=["digits"], probe_images=300, digits_path=str(tmp_path / "digits.png")).setup()


# ----------------------------------------------------------------------------- probes
def _clusters(n: int, classes: int = 4, dim: int = 8, noise: float = 0.3, seed: int = 0):
    """``n`` points around 4 fixed centres (noise drawn with ``seed``) and their labels."""
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(0)) * 3
    labels = torch.arange(n) % classes
    return centres[labels] + noise * torch.randn(n, dim, generator=torch.Generator().manual_seed(seed + 1)), labels


def test_knn_and_linear_probe_on_separable_and_random_data() -> None:
    x, y = _clusters(200)
    xt, yt = _clusters(100, seed=1)
    assert knn_accuracy(x, y, xt, yt) == 1.0
    assert linear_probe_accuracy(x, y, xt, yt) == 1.0
    # labels independent of the features: both probes near chance (1/4)
    shuffled = y[torch.randperm(200, generator=torch.Generator().manual_seed(3))]
    assert knn_accuracy(x, shuffled, xt, yt) < 0.5
    assert linear_probe_accuracy(x, shuffled, xt, yt) < 0.5
    # k = 1 is the nearest neighbour's label
    assert knn_accuracy(torch.tensor([[1.0, 0], [0, 1]]), torch.tensor([0, 1]), torch.tensor([[0.9, 0.2]]),
                        torch.tensor([0]), k=1) == 1.0


def test_feature_probe_metric() -> None:
    x, y = _clusters(120)
    metric = FeatureProbe(k=5)
    probe = torch.arange(120) < 80
    for i in range(0, 120, 32):
        sl = slice(i, i + 32)
        metric.update(x[sl], y[sl], probe[sl], reference=-x[sl] if i == 0 else x[sl])
    out = metric.compute()
    assert out["knn_acc"] == 1.0 and out["probe_acc"] == 1.0
    assert abs(float(out["feature_cos"]) - (88 - 32) / 120) < 1e-9  # 32 images at cos -1, 88 at +1
    metric.reset()
    metric.update(x[:4], y[:4], torch.zeros(4, dtype=torch.bool), x[:4])
    assert set(metric.compute()) == {"feature_cos"}  # no probe images: no accuracies
    with pytest.raises(FloatingPointError):
        metric.update(torch.full((1, 8), float("nan")), y[:1], probe[:1])
