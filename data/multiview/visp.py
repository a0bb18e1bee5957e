"""ViSP's RGB-D tracking sequences (Debian ``visp-images-data``, ``ViSP-images/mbt-depth``) as multi-view samples.

Formats (as ViSP's ``testGenericTracker.cpp`` and ``testGenericTrackerDepth.cpp`` read them):

* depth ``.bin``: little-endian ``uint32 height, uint32 width``, then ``height·width`` little-endian
  ``uint16`` raw values, row-major; ``0`` = no measurement.  Metres = raw · scale, with
  ``scale = 1/32768`` (0.000030518) for the rendered ``Castle-simu`` and ``0.000124986647`` (the
  Creative SR300) for the real ``castel``.
* camera ``.xml`` (ViSP's tracker config): ``<camera><px/><py/><u0/><v0/></camera>`` = fx, fy, cx, cy
  of a distortion-free pinhole (``Config/chateau.xml`` grey camera, ``chateau_depth.xml`` depth camera).
* pose ``.txt``: a 4x4 homogeneous matrix, whitespace separated.  ``CameraPose/Camera_NNN.txt`` is
  ``cMo`` (object -> grey camera), i.e. OpenCV camera-from-world with the object as the world;
  ``castel/depth_M_color.txt`` maps grey-camera points into the depth camera.

The depth maps are measured by the *depth* camera, so they are warped into the grey camera before
use: ``X_d = d K_d⁻¹ [u, v, 1]ᵀ``, ``X_c = (depth_M_color)⁻¹ X_d``, splatted to the nearest grey
pixel with a z-buffer (nearest surface wins); unfilled pixels are invalid.  For ``Castle-simu``
``depth_M_color`` is not a file: ViSP's test hard-codes a 5 cm shift, ``t = (-0.05, 0, 0)``
(:data:`CASTLE_SIMU_DEPTH_M_COLOR`); the test of this module checks it against the poses.

Sets:

* :class:`CastleSimuDataset`: 40 rendered 640x480 frames (1-based), poses and depth.  Sample ``k``
  takes ``num_views`` frames ``offset_k + stride·j`` (``offset_k = k``), so the views span up to
  ``stride·(num_views-1)`` frames of the orbit (about 45 degrees for 8 views at stride 5).
* :class:`CastelDataset`: 30 real frames (0-based) with SR300 depth, no poses (extrinsics are
  identity placeholders; score depth only, ``has_poses`` is False).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.multiview.assets import visp_root
from data.multiview.common import check_image_size, check_num_views, load_rgb, make_sample, prepare_view, require_file

CASTLE_SIMU_DEPTH_SCALE = 1.0 / 32768.0
CASTEL_DEPTH_SCALE = 0.000124986647
CASTLE_SIMU_DEPTH_M_COLOR = torch.tensor(
    [[1.0, 0.0, 0.0, -0.05], [0.0, 1.0, 0.0, 0.0], [0.0, 0.0, 1.0, 0.0], [0.0, 0.0, 0.0, 1.0]], dtype=torch.float64
)


# ----------------------------------------------------------------------------- file formats
def read_depth_bin(path: Path) -> np.ndarray:
    """ViSP raw depth ``.bin`` -> ``uint16 [h, w]`` (see module docstring)."""
    data = require_file(Path(path), "ViSP depth .bin").read_bytes()
    if len(data) < 8:
        raise ValueError(f"{path}: {len(data)} bytes, shorter than the 8-byte height/width header")
    h, w = (int(x) for x in np.frombuffer(data[:8], dtype="<u4"))
    if len(data) != 8 + 2 * h * w:
        raise ValueError(f"{path}: header says {h}x{w} uint16 ({8 + 2 * h * w} bytes), file has {len(data)} bytes")
    return np.frombuffer(data[8:], dtype="<u2").reshape(h, w).copy()


def write_depth_bin(path: Path, raw: np.ndarray) -> None:
    """Write ``uint16 [h, w]`` in ViSP's ``.bin`` format (fixtures, round trips)."""
    raw = np.asarray(raw)
    if raw.dtype != np.uint16 or raw.ndim != 2:
        raise ValueError(f"expected a uint16 [h, w] array, got {raw.dtype} {raw.shape}")
    Path(path).write_bytes(np.array(raw.shape, dtype="<u4").tobytes() + raw.astype("<u2").tobytes())


def read_camera_xml(path: Path) -> Tensor:
    """``K [3, 3]`` (float64) from the ``<camera>`` block of a ViSP tracker config."""
    text = require_file(Path(path), "ViSP camera .xml").read_text()
    block = re.search(r"<camera>(.*?)</camera>", text, re.S)
    if block is None:
        raise ValueError(f"{path} has no <camera> block")
    values = {}
    for key in ("px", "py", "u0", "v0"):
        found = re.search(rf"<{key}>\s*([-+0-9.eE]+)\s*</{key}>", block.group(1))
        if found is None:
            raise ValueError(f"{path}: <camera> lacks <{key}>")
        values[key] = float(found.group(1))
    return torch.tensor([[values["px"], 0.0, values["u0"]], [0.0, values["py"], values["v0"]], [0.0, 0.0, 1.0]],
                        dtype=torch.float64)


def read_homogeneous(path: Path) -> Tensor:
    """A 4x4 homogeneous matrix from a whitespace-separated text file (float64)."""
    values = require_file(Path(path), "4x4 pose .txt").read_text().split()
    if len(values) != 16:
        raise ValueError(f"{path}: expected 16 numbers (a 4x4 matrix), found {len(values)}")
    m = torch.tensor([float(v) for v in values], dtype=torch.float64).reshape(4, 4)
    if not torch.allclose(m[3], torch.tensor([0.0, 0.0, 0.0, 1.0], dtype=torch.float64)):
        raise ValueError(f"{path}: last row {m[3].tolist()} is not [0, 0, 0, 1]")
    return m


def reproject_depth(depth: Tensor, k_src: Tensor, k_dst: Tensor, dst_from_src: Tensor,
                    out_hw: tuple[int, int]) -> Tensor:
    """Warp a z-depth map ``[h, w]`` (0 = invalid) from a source camera into a destination camera.

    ``dst_from_src [4, 4]`` maps source-camera points to destination-camera points.  Every valid
    source pixel is splatted to the nearest destination pixel; the smallest depth wins.
    Returns ``[H, W]`` float64 z-depth in the destination camera, 0 where nothing landed.
    """
    h, w = depth.shape
    depth = depth.double()
    v, u = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    ok = torch.isfinite(depth) & (depth > 0)
    pix = torch.stack([u[ok], v[ok], torch.ones_like(u[ok])])  # [3, N]
    pts = (torch.linalg.inv(k_src.double()) @ pix) * depth[ok]
    pts = dst_from_src[:3, :3].double() @ pts + dst_from_src[:3, 3:].double()
    proj = k_dst.double() @ pts
    z = pts[2]
    front = z > 1e-9
    x = torch.round(proj[0][front] / z[front]).long()
    y = torch.round(proj[1][front] / z[front]).long()
    z = z[front]
    H, W = out_hw
    inside = (x >= 0) & (x < W) & (y >= 0) & (y < H)
    out = torch.full((H * W,), float("inf"), dtype=torch.float64)
    out.scatter_reduce_(0, (y * W + x)[inside], z[inside], reduce="amin")
    return torch.where(torch.isfinite(out), out, torch.zeros_like(out)).reshape(H, W)


# ----------------------------------------------------------------------------- datasets

def clip_count(frames: int, num_views: int, stride: int, num_samples: int | None) -> int:
    """Clips of ``num_views`` frames ``stride`` apart that ``frames`` frames hold (at most ``num_samples``)."""
    fit = frames - stride * (check_num_views(num_views) - 1)
    if fit < 1:
        raise ValueError(f"{frames} frames cannot hold {num_views} views at stride {stride}; lower either")
    return fit if num_samples is None else min(num_samples, fit)

class _ViSPSequence(Dataset):
    """Shared frame loading: grey image, depth warped into the grey camera, resize/crop."""

    depth_scale: float

    def __init__(self, num_views: int, image_size: tuple[int, int], num_samples: int, stride: int) -> None:
        self.num_views = check_num_views(num_views)
        self.image_size = check_image_size(image_size)
        if stride < 1 or num_samples < 1:
            raise ValueError(f"stride and num_samples must be >= 1, got {stride} and {num_samples}")
        self.stride, self.num_samples = stride, num_samples

    def frame_ids(self) -> list[int]:
        raise NotImplementedError

    def clip(self, index: int) -> list[int]:
        """Frame ids of sample ``index``: ``ids[index + stride·j]``, j < num_views."""
        ids = self.frame_ids()
        span = self.stride * (self.num_views - 1)
        if index + span >= len(ids):
            raise IndexError(f"sample {index} needs frames up to position {index + span}, the sequence has {len(ids)}")
        return [ids[index + self.stride * j] for j in range(self.num_views)]

    def __len__(self) -> int:
        return self.num_samples

    def _view(self, image_path: Path, depth_path: Path, k_color: Tensor, k_depth: Tensor,
              color_from_depth: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        image = load_rgb(image_path)
        grid = tuple(image.shape[-2:])
        raw = torch.from_numpy(read_depth_bin(depth_path).astype(np.float64))
        depth = reproject_depth(raw * self.depth_scale, k_depth, k_color, color_from_depth, grid)
        return prepare_view(image, depth.float(), None, k_color, grid, self.image_size)


class CastleSimuDataset(_ViSPSequence):
    """``mbt-depth/Castle-simu``: rendered grey frames with GT poses and depth (module docstring).

    Args:
        root: the ``ViSP-images`` folder (default: found by :func:`data.multiview.assets.visp_root`).
        num_views: views per sample.
        image_size: ``(H, W)`` after cover-resize and centre crop (multiples of 14).
        stride: frame step between consecutive views of a sample.
        num_samples: samples (sample ``k`` starts at frame position ``k``); ``None`` = all that fit.
    """

    depth_scale = CASTLE_SIMU_DEPTH_SCALE

    def __init__(self, root: str | Path | None = None, num_views: int = 8, image_size: tuple[int, int] = (112, 154),
                 stride: int = 5, num_samples: int | None = None) -> None:
        self.dir = visp_root(root) / "mbt-depth" / "Castle-simu"
        self._ids = sorted(int(p.stem.split("_")[1]) for p in (self.dir / "CameraPose").glob("Camera_*.txt"))
        if not self._ids:
            raise FileNotFoundError(f"no CameraPose/Camera_NNN.txt under {self.dir}")
        super().__init__(num_views, image_size, clip_count(len(self._ids), num_views, stride, num_samples), stride)
        self.k_color = read_camera_xml(self.dir / "Config" / "chateau.xml")
        self.k_depth = read_camera_xml(self.dir / "Config" / "chateau_depth.xml")
        self.color_from_depth = torch.linalg.inv(CASTLE_SIMU_DEPTH_M_COLOR)

    def frame_ids(self) -> list[int]:
        return self._ids

    def paths(self, frame: int) -> tuple[Path, Path, Path]:
        """Image, depth and pose files of a 1-based frame id."""
        image = self.dir / "Images" / f"Image_{frame:04d}.pgm"
        if not image.is_file() and (self.dir / "Images" / f"Image_{frame:04d}.png").is_file():
            image = self.dir / "Images" / f"Image_{frame:04d}.png"  # visp-images >= 3.6 ships PNG
        return image, self.dir / "Depth" / f"Depth_{frame:04d}.bin", self.dir / "CameraPose" / f"Camera_{frame:03d}.txt"

    def __getitem__(self, index: int) -> dict:
        views = [[], [], [], [], []]
        for frame in self.clip(index):
            image_path, depth_path, pose_path = self.paths(frame)
            image, depth, mask, k = self._view(image_path, depth_path, self.k_color, self.k_depth,
                                               self.color_from_depth)
            for store, item in zip(views, (image, depth, mask, k, read_homogeneous(pose_path)[:3].float())):
                store.append(item)
        sample = make_sample(*views, scene=f"castle_simu-{index}")
        sample["has_poses"] = torch.tensor(True)
        return sample


class CastelDataset(_ViSPSequence):
    """``mbt-depth/castel``: real SR300 grey frames + depth, intrinsics, depth-to-grey extrinsic; no poses.

    Args:
        root: the ``ViSP-images`` folder (default: found by :func:`data.multiview.assets.visp_root`).
        num_views: views per sample (fed together to the model; depth is scored per view).
        image_size: ``(H, W)`` after cover-resize and centre crop.
        stride: frame step between views.
        num_samples: samples (``None`` = all that fit).
    """

    depth_scale = CASTEL_DEPTH_SCALE

    def __init__(self, root: str | Path | None = None, num_views: int = 4, image_size: tuple[int, int] = (112, 154),
                 stride: int = 3, num_samples: int | None = None) -> None:
        base = visp_root(root) / "mbt-depth" / "castel"
        self.dir = base / "castel"
        self._ids = sorted(int(p.stem.split("_")[1]) for p in self.dir.glob("image_*.pgm"))
        if not self._ids:
            raise FileNotFoundError(f"no image_NNNN.pgm under {self.dir}")
        super().__init__(num_views, image_size, clip_count(len(self._ids), num_views, stride, num_samples), stride)
        self.k_color = read_camera_xml(base / "chateau.xml")
        self.k_depth = read_camera_xml(base / "chateau_depth.xml")
        self.color_from_depth = torch.linalg.inv(read_homogeneous(base / "depth_M_color.txt"))

    def frame_ids(self) -> list[int]:
        return self._ids

    def __getitem__(self, index: int) -> dict:
        views = [[], [], [], []]
        for frame in self.clip(index):
            out = self._view(self.dir / f"image_{frame:04d}.pgm", self.dir / f"depth_image_{frame:04d}.bin",
                             self.k_color, self.k_depth, self.color_from_depth)
            for store, item in zip(views, out):
                store.append(item)
        identity = [torch.eye(3, 4) for _ in range(self.num_views)]
        sample = make_sample(views[0], views[1], views[2], views[3], identity, scene=f"castel-{index}")
        sample["has_poses"] = torch.tensor(False)
        return sample
