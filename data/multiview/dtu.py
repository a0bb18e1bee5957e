"""DTU loader in the MVSNet pre-processed training format.

On-disk layout (``<root>`` = the ``mvs_training/dtu`` folder)::

    Cameras/train/XXXXXXXX_cam.txt           8-digit 0-based view id, shared by all scans
    Rectified/scanN_train/rect_VVV_L_r5000.png   VVV = view id + 1 (3 digits), L = light 0..6
    Depths/scanN_train/depth_map_XXXX.pfm     4-digit 0-based view id, z-depth in mm, 0 = invalid
    Depths/scanN_train/depth_visual_XXXX.png  optional binary mask of reliable depth

A cam file reads::

    extrinsic
    r11 r12 r13 t1          (4x4 camera-from-world, OpenCV axes, mm)
    ...
    0 0 0 1

    intrinsic
    fx 0 cx                 (3x3, pixels)
    0 fy cy
    0 0 1

    DEPTH_MIN DEPTH_INTERVAL [DEPTH_NUM DEPTH_MAX]

In this training release the intrinsics describe the *depth-map grid* (160x128, a quarter
of the 640x512 rectified images, covering the same field of view); MVSNet-style code
multiplies them by 4 for full-resolution images.  We keep them on the depth grid and let
:class:`data.multiview.common.ResizeCrop` map them to the output size (exact under the
pixel-centre convention), resampling the image and the depth onto the same grid.  Use
``cameras_subdir`` if your camera files live elsewhere and describe the depth grid.

PFM: a text header ``Pf`` (1 channel) or ``PF`` (3 channels), ``W H``, and a scale whose
sign gives the endianness (negative = little-endian), then float32 rows stored
bottom-to-top.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.multiview.common import FolderMultiViewDataset, FrameRecord, load_binary_mask, require_file

log = logging.getLogger(__name__)


def read_pfm(path: Path) -> np.ndarray:
    """Read a PFM file as float32 ``[H, W]`` or ``[H, W, 3]`` (top row first)."""
    with open(require_file(path, "PFM depth map"), "rb") as f:
        header = f.readline().strip()
        if header not in (b"Pf", b"PF"):
            raise ValueError(f"{path} is not a PFM file (header {header!r})")
        dims = f.readline().split()
        while not dims:
            dims = f.readline().split()
        width, height = int(dims[0]), int(dims[1])
        scale = float(f.readline().strip())
        channels = 3 if header == b"PF" else 1
        data = np.frombuffer(f.read(), dtype="<f4" if scale < 0 else ">f4")
    if data.size < width * height * channels:
        raise ValueError(f"{path}: truncated PFM ({data.size} floats for {width}x{height}x{channels})")
    data = data[: width * height * channels].reshape(height, width, channels)[::-1]
    return np.ascontiguousarray(data[..., 0] if channels == 1 else data).astype(np.float32)


def read_mvsnet_cam(path: Path) -> tuple[Tensor, Tensor, float, float]:
    """Parse an MVSNet cam file: ``extrinsics [3,4]``, ``K [3,3]`` (float64), depth min, interval."""
    with open(require_file(path, "MVSNet camera file")) as f:
        words = f.read().split()
    try:
        e = words.index("extrinsic")
        k = words.index("intrinsic")
        extrinsic = torch.tensor([float(w) for w in words[e + 1 : e + 17]], dtype=torch.float64).reshape(4, 4)
        intrinsic = torch.tensor([float(w) for w in words[k + 1 : k + 10]], dtype=torch.float64).reshape(3, 3)
        rest = [float(w) for w in words[k + 10 :]]
    except (ValueError, IndexError) as err:
        raise ValueError(f"malformed MVSNet camera file {path}: expected 'extrinsic' 4x4 and 'intrinsic' 3x3") from err
    depth_min, depth_interval = (rest + [0.0, 0.0])[:2]
    return extrinsic[:3], intrinsic, depth_min, depth_interval


class DTUDataset(FolderMultiViewDataset):
    """DTU scans (MVSNet training release) as multi-view samples (one per scan).

    Args:
        root: folder holding ``Cameras``, ``Rectified`` and ``Depths``.
        scans: scan names such as ``"scan1"``; ``None`` = all ``Rectified/scan*_train``.
        num_views: views per sample.
        image_size: output ``(H, W)``, multiples of 14.
        light_index: lighting condition 0..6 of the rectified images.
        frame_selection: ``"uniform"`` or ``"random"`` (seeded).
        seed: seed of random view selection.
        cameras_subdir: folder of ``XXXXXXXX_cam.txt`` files (intrinsics on the depth grid).
        use_depth_visual_mask: AND the depth with ``depth_visual_XXXX.png`` when present.
    """

    def __init__(
        self,
        root: str | Path,
        scans: Sequence[str] | None = None,
        num_views: int = 8,
        image_size: tuple[int, int] = (392, 504),
        light_index: int = 3,
        frame_selection: str = "uniform",
        seed: int = 0,
        cameras_subdir: str = "Cameras/train",
        use_depth_visual_mask: bool = True,
    ) -> None:
        super().__init__(num_views, image_size, frame_selection, seed)
        self.root = Path(root)
        self.light_index, self.cameras_subdir = light_index, cameras_subdir
        self.use_depth_visual_mask = use_depth_visual_mask
        self._cam_cache: dict[int, tuple[Tensor, Tensor]] = {}
        names = self.available_scenes(self.root) if scans is None else list(scans)
        self._keep_scenes_with_enough_frames([(n, self._read_scan(n)) for n in names], self.root)
        log.info("DTU: %d scans from %s", len(self.scenes), self.root)

    @staticmethod
    def available_scenes(root: str | Path) -> list[str]:
        """Scan names with a ``Rectified/<scan>_train`` folder, in numeric order."""
        dirs = [p.name[: -len("_train")] for p in Path(root).glob("Rectified/scan*_train") if p.is_dir()]
        if not dirs:
            raise FileNotFoundError(f"no Rectified/scan*_train folder under {root}; is it the MVSNet DTU root?")
        return sorted(dirs, key=lambda n: int(re.sub(r"\D", "", n) or 0))

    def _camera(self, view: int) -> tuple[Tensor, Tensor]:
        if view not in self._cam_cache:
            e, k, _, _ = read_mvsnet_cam(self.root / self.cameras_subdir / f"{view:08d}_cam.txt")
            self._cam_cache[view] = (e.float(), k.float())
        return self._cam_cache[view]

    def _read_scan(self, scan: str) -> list[FrameRecord]:
        pattern = re.compile(rf"rect_(\d{{3}})_{self.light_index}_r5000\.png$")
        folder = self.root / "Rectified" / f"{scan}_train"
        views = sorted(int(m.group(1)) - 1 for p in folder.glob("rect_*.png") if (m := pattern.match(p.name)))
        frames = []
        for view in views:
            depth_path = self.root / "Depths" / f"{scan}_train" / f"depth_map_{view:04d}.pfm"
            e, k = self._camera(view)
            depth_hw = read_pfm_shape(depth_path)
            frames.append(
                FrameRecord(
                    image_path=folder / f"rect_{view + 1:03d}_{self.light_index}_r5000.png",
                    extrinsics=e,
                    intrinsics=k,
                    camera_grid_hw=depth_hw,
                    depth_path=depth_path,
                    extra={"mask_path": depth_path.with_name(f"depth_visual_{view:04d}.png")},
                )
            )
        return frames

    def load_depth(self, frame: FrameRecord) -> tuple[Tensor | None, Tensor | None]:
        depth = torch.from_numpy(read_pfm(frame.depth_path))
        mask_path = frame.extra["mask_path"]
        valid = load_binary_mask(mask_path) if self.use_depth_visual_mask and mask_path.is_file() else None
        if valid is not None and valid.shape != depth.shape:
            raise ValueError(f"{mask_path} is {tuple(valid.shape)} but {frame.depth_path} is {tuple(depth.shape)}")
        return depth, valid


def read_pfm_shape(path: Path) -> tuple[int, int]:
    """``(H, W)`` from a PFM header without reading the data."""
    with open(require_file(path, "PFM depth map"), "rb") as f:
        f.readline()
        dims = f.readline().split()
        while not dims:
            dims = f.readline().split()
    return int(dims[1]), int(dims[0])
