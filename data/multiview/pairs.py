"""Two real image pairs with ground-truth correspondences: the Middlebury motorcycle and the graf pair.

**Middlebury 2014 motorcycle** (scikit-image ships it 4x down-sampled: ``motorcycle_left.png``,
``motorcycle_right.png``, 741x500, and the left disparity ``motorcycle_disp.npz``, ``inf`` = unknown).
A rectified pair: with focal ``f``, left principal point ``(cx, cy)``, ``doffs = cx_right - cx``
and baseline ``B``, a left pixel ``(x, y)`` of disparity ``d`` is seen at ``(x - d, y)`` on the
right and lies at depth ``Z = B f / (d + doffs)``.  The right camera is the left one moved by
``B`` along +x: ``E_left = [I | 0]``, ``E_right = [I | (-B, 0, 0)]``, ``K_right`` = ``K_left`` with
``cx + doffs``.  Calibration: Middlebury's ``calib.txt`` format (``cam0=[f 0 cx; 0 f cy; 0 0 1]``,
``doffs=``, ``baseline=`` in mm); :data:`MOTORCYCLE_QUARTER_CALIB` is the one scikit-image documents
for its down-sampled copy.  A full-size Middlebury folder (``im0.png``, ``im1.png``, ``disp0.pfm``,
``calib.txt``) reads the same way (:func:`read_middlebury_folder`).

**graf** (Mikolajczyk's viewpoint set, in opencv-doc: ``graf1.png``, ``graf3.png``, 800x640, and
``H1to3p.xml``, an OpenCV ``opencv-matrix``): a planar wall, so ``x_3 ~ H x_1`` for every pixel.
No depth and no metric cameras: only correspondences are scored.

Samples are the multi-view dicts of :mod:`data.multiview.common` (2 views, resized / centre-cropped
to ``image_size``) plus ``query_points [N, 2]`` (pixels of view 0, at ``image_size``),
``target_points [N, 2]`` (where they are in view 1) and ``has_poses``.  A point ``p`` maps to the
resized grid as ``p' = s (p + ½) - ½ - offset`` per axis, the homography as ``H' = A_3 H A_1⁻¹``.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.multiview.assets import opencv_data_root, skimage_data_root
from data.multiview.common import ResizeCrop, check_image_size, load_rgb, make_sample, prepare_view, require_file
from data.multiview.dtu import read_pfm
from data.multiview.visp import reproject_depth

MOTORCYCLE_QUARTER_CALIB = """cam0=[994.978 0 311.193; 0 994.978 254.877; 0 0 1]
cam1=[994.978 0 342.279; 0 994.978 254.877; 0 0 1]
doffs=31.086
baseline=193.001
"""


# ----------------------------------------------------------------------------- formats
def parse_middlebury_calib(text: str) -> dict:
    """Middlebury ``calib.txt`` -> ``{"K0": [3,3], "K1": [3,3], "doffs": float, "baseline_m": float}``."""
    fields = dict(line.split("=", 1) for line in text.splitlines() if "=" in line)
    try:
        mats = {}
        for cam in ("cam0", "cam1"):
            nums = [float(v) for v in re.split(r"[\s;\[\]]+", fields[cam].strip()) if v]
            if len(nums) != 9:
                raise ValueError(f"{cam} has {len(nums)} numbers, expected 9")
            mats[cam] = torch.tensor(nums, dtype=torch.float64).reshape(3, 3)
        doffs, baseline = float(fields["doffs"]), float(fields["baseline"])
    except KeyError as err:
        raise ValueError(f"Middlebury calib.txt lacks the field {err}") from err
    return {"K0": mats["cam0"], "K1": mats["cam1"], "doffs": doffs, "baseline_m": baseline / 1000.0}


def read_opencv_matrix_xml(path: Path, name: str | None = None) -> Tensor:
    """The (first, or ``name``d) ``opencv-matrix`` of an OpenCV FileStorage XML file, float64."""
    text = require_file(Path(path), "OpenCV matrix .xml").read_text()
    tag = re.escape(name) if name else r"[A-Za-z_]\w*"
    pattern = r"<(" + tag + r")\s+type_id=\"opencv-matrix\">(.*?)</\1>"
    found = re.search(pattern, text, re.S)
    if found is None:
        raise ValueError(f"{path}: no opencv-matrix{' named ' + name if name else ''}")
    body = found.group(2)
    rows, cols = (int(re.search(rf"<{k}>\s*(\d+)\s*</{k}>", body).group(1)) for k in ("rows", "cols"))
    data = [float(v) for v in re.search(r"<data>(.*?)</data>", body, re.S).group(1).split()]
    if len(data) != rows * cols:
        raise ValueError(f"{path}: {rows}x{cols} matrix with {len(data)} values")
    return torch.tensor(data, dtype=torch.float64).reshape(rows, cols)


def map_points(rc: ResizeCrop, points: Tensor) -> Tensor:
    """Source-grid pixel coordinates ``[N, 2]`` (x, y) -> coordinates on the resized/cropped grid."""
    sy, sx = rc.resized[0] / rc.src[0], rc.resized[1] / rc.src[1]
    x = sx * (points[:, 0] + 0.5) - 0.5 - rc.left
    y = sy * (points[:, 1] + 0.5) - 0.5 - rc.top
    return torch.stack([x, y], dim=-1)


def _resize_matrix(rc: ResizeCrop) -> Tensor:
    sy, sx = rc.resized[0] / rc.src[0], rc.resized[1] / rc.src[1]
    return torch.tensor([[sx, 0.0, 0.5 * sx - 0.5 - rc.left], [0.0, sy, 0.5 * sy - 0.5 - rc.top], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)


def _grid_points(h: int, w: int, count: int, margin: int) -> Tensor:
    """About ``count`` points ``[N, 2]`` (x, y) on a regular grid of the ``h x w`` image, ``margin`` px inside."""
    side = max(2, int(round(count**0.5)))
    ys = torch.linspace(margin, h - 1 - margin, side, dtype=torch.float64)
    xs = torch.linspace(margin, w - 1 - margin, side, dtype=torch.float64)
    yy, xx = torch.meshgrid(ys, xs, indexing="ij")
    return torch.stack([xx.flatten(), yy.flatten()], dim=-1)


def _inside(points: Tensor, hw: tuple[int, int]) -> Tensor:
    return (points[:, 0] >= 0) & (points[:, 0] <= hw[1] - 1) & (points[:, 1] >= 0) & (points[:, 1] <= hw[0] - 1)


# ----------------------------------------------------------------------------- the sets
def read_middlebury_folder(folder: Path) -> tuple[Tensor, Tensor, np.ndarray, dict]:
    """Left, right images ``[3, h, w]``, left disparity ``[h, w]`` (inf = unknown) and calibration.

    Reads scikit-image's copy (``motorcycle_*.png``, ``motorcycle_disp.npz``, calibration
    :data:`MOTORCYCLE_QUARTER_CALIB`) or a Middlebury 2014 folder (``im0.png``, ``im1.png``,
    ``disp0.pfm``, ``calib.txt``).
    """
    folder = Path(folder)
    if (folder / "calib.txt").is_file():
        calib = parse_middlebury_calib((folder / "calib.txt").read_text())
        disp = read_pfm(folder / "disp0.pfm")
        left, right = load_rgb(folder / "im0.png"), load_rgb(folder / "im1.png")
    else:
        calib = parse_middlebury_calib(MOTORCYCLE_QUARTER_CALIB)
        with np.load(require_file(folder / "motorcycle_disp.npz", "motorcycle disparity")) as z:
            disp = np.asarray(z[z.files[0]], dtype=np.float32)
        left, right = load_rgb(folder / "motorcycle_left.png"), load_rgb(folder / "motorcycle_right.png")
    if disp.shape != tuple(left.shape[-2:]) or left.shape != right.shape:
        raise ValueError(
            f"{folder}: disparity {disp.shape} and images {tuple(left.shape)}, {tuple(right.shape)} differ"
        )
    return left, right, disp, calib


class MotorcyclePair(Dataset):
    """The Middlebury motorcycle as one 2-view sample (module docstring): depth of the left view (and of the
    right one, warped from it with a z-buffer; holes where the left view does not see), GT pose,
    ``num_points`` disparity correspondences.

    Args:
        root: folder with the files (default: scikit-image's data folder, :func:`skimage_data_root`).
        image_size: ``(H, W)`` after cover-resize and centre crop (multiples of 14).
        num_points: about this many query points on a grid, kept where the disparity is known and the
            match stays inside the right view.
    """

    def __init__(self, root: str | Path | None = None, image_size: tuple[int, int] = (112, 168),
                 num_points: int = 256) -> None:
        full_size = root is not None and (Path(root) / "calib.txt").is_file()  # a Middlebury 2014 folder
        self.folder = Path(root) if full_size else skimage_data_root(root)
        self.image_size, self.num_points = check_image_size(image_size), num_points

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int) -> dict:
        if index != 0:
            raise IndexError("the motorcycle set has a single sample")
        left, right, disp, calib = read_middlebury_folder(self.folder)
        grid = tuple(left.shape[-2:])
        disp_t = torch.from_numpy(disp).double()
        known = torch.isfinite(disp_t) & (disp_t > 0)
        depth = torch.where(known, calib["baseline_m"] * calib["K0"][0, 0] / (disp_t + calib["doffs"]),
                            torch.zeros_like(disp_t))
        e_left = torch.eye(3, 4, dtype=torch.float64)
        e_right = e_left.clone()
        e_right[0, 3] = -calib["baseline_m"]
        right_from_left = torch.eye(4, dtype=torch.float64)
        right_from_left[0, 3] = -calib["baseline_m"]
        depth_right = reproject_depth(depth, calib["K0"], calib["K1"], right_from_left, grid)  # z-buffered warp
        views = [prepare_view(left, depth.float(), None, calib["K0"], grid, self.image_size),
                 prepare_view(right, depth_right.float(), None, calib["K1"], grid, self.image_size)]
        sample = make_sample([v[0] for v in views], [v[1] for v in views], [v[2] for v in views],
                             [v[3] for v in views], [e_left, e_right], scene="middlebury-motorcycle")
        rc = ResizeCrop.cover(grid, self.image_size)
        pts = _grid_points(grid[0], grid[1], self.num_points, margin=4).round()  # pixels with a disparity
        d = disp_t[pts[:, 1].long(), pts[:, 0].long()]
        ok = torch.isfinite(d) & (d > 0)
        src, dst = pts[ok], pts[ok] - torch.stack([d[ok], torch.zeros_like(d[ok])], dim=-1)
        src, dst = map_points(rc, src), map_points(rc, dst)
        keep = _inside(src, self.image_size) & _inside(dst, self.image_size)
        sample.update(query_points=src[keep].float(), target_points=dst[keep].float(), has_poses=torch.tensor(True))
        return sample


class GrafPair(Dataset):
    """graf1 -> graf3 with the ground-truth homography: one 2-view sample, correspondences only.

    Args:
        root: opencv-doc's ``examples/data`` (default: :func:`opencv_data_root`).
        image_size: ``(H, W)`` after cover-resize and centre crop.
        num_points: about this many grid points of view 0, kept where ``H`` maps them inside view 1.
        focal_fraction: nominal focal ``= focal_fraction · max(H, W)`` for the placeholder intrinsics.
    """

    def __init__(self, root: str | Path | None = None, image_size: tuple[int, int] = (112, 140),
                 num_points: int = 256, focal_fraction: float = 1.0) -> None:
        self.folder = opencv_data_root(root)
        self.image_size, self.num_points, self.focal_fraction = check_image_size(image_size), num_points, focal_fraction

    def __len__(self) -> int:
        return 1

    def homography(self) -> Tensor:
        """``H1to3p`` on the original pixel grid (float64)."""
        return read_opencv_matrix_xml(self.folder / "H1to3p.xml")

    def __getitem__(self, index: int) -> dict:
        if index != 0:
            raise IndexError("the graf set has a single sample")
        images = [load_rgb(self.folder / "graf1.png"), load_rgb(self.folder / "graf3.png")]
        grids = [tuple(im.shape[-2:]) for im in images]
        H, W = self.image_size
        views = []
        for image, grid in zip(images, grids):
            f = self.focal_fraction * max(grid)
            k = torch.tensor([[f, 0, (grid[1] - 1) / 2], [0, f, (grid[0] - 1) / 2], [0, 0, 1]], dtype=torch.float64)
            views.append(prepare_view(image, None, None, k, grid, self.image_size))
        identity = [torch.eye(3, 4), torch.eye(3, 4)]
        sample = make_sample([v[0] for v in views], [v[1] for v in views], [v[2] for v in views],
                             [v[3] for v in views], identity, scene="graf-1to3")
        rc1, rc3 = ResizeCrop.cover(grids[0], self.image_size), ResizeCrop.cover(grids[1], self.image_size)
        h_small = _resize_matrix(rc3) @ self.homography() @ torch.linalg.inv(_resize_matrix(rc1))
        src = _grid_points(H, W, self.num_points, margin=2)
        hom = torch.cat([src, torch.ones(len(src), 1, dtype=torch.float64)], dim=-1) @ h_small.T
        dst = hom[:, :2] / hom[:, 2:]
        keep = _inside(dst, self.image_size)
        sample.update(query_points=src[keep].float(), target_points=dst[keep].float(), homography=h_small.float(),
                      has_poses=torch.tensor(False))
        return sample
