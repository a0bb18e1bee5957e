"""ETH3D high-resolution multi-view loader (COLMAP text calibration + raw float depth).

On-disk layout per scene (``<root>/<scene>/``)::

    dslr_calibration_undistorted/cameras.txt    COLMAP: CAMERA_ID MODEL WIDTH HEIGHT PARAMS...
    dslr_calibration_undistorted/images.txt     COLMAP: IMAGE_ID QW QX QY QZ TX TY TZ CAMERA_ID NAME
                                                (+ one line of 2-D points per image, ignored)
    images/<NAME>                               e.g. images/dslr_images_undistorted/DSC_0286.JPG
    ground_truth_depth/<NAME>                   raw little-endian float32, WIDTH x HEIGHT row-major,
                                                z-depth; invalid pixels are +inf (or 0)

Only pinhole models are accepted (``PINHOLE``: fx fy cx cy; ``SIMPLE_PINHOLE``: f cx cy).
ETH3D publishes its GT depth for the *distorted* ``dslr_images`` (``dslr_calibration_jpg``,
``THIN_PRISM_FISHEYE``); undistort those depth maps into ``ground_truth_depth/<NAME>`` for
the undistorted images, or point ``calibration_subdir`` / ``depth_subdir`` at a pinhole
calibration whose image names match the depth files.

Conventions: COLMAP's ``(q, t)`` is already world-to-camera in the OpenCV axes,
``R = R(q)``, ``X_cam = R X + t``.  COLMAP puts the centre of the top-left pixel at
``(0.5, 0.5)``, so ``cx_cv = cx_colmap - 1/2`` (same for ``cy``).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from data.multiview.common import FolderMultiViewDataset, FrameRecord, require_file
from data.multiview.geometry import quaternion_to_matrix

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ColmapCamera:
    """A COLMAP camera: ``model``, ``width``, ``height``, ``params``."""

    model: str
    width: int
    height: int
    params: tuple[float, ...]

    def intrinsics(self) -> Tensor:
        """OpenCV ``K [3,3]`` (pixel centres at integers) of a pinhole COLMAP camera."""
        if self.model == "PINHOLE":
            fx, fy, cx, cy = self.params[:4]
        elif self.model == "SIMPLE_PINHOLE":
            fx, cx, cy = self.params[:3]
            fy = fx
        else:
            raise ValueError(
                f"COLMAP camera model {self.model} is not a pinhole model; use the undistorted calibration "
                "(dslr_calibration_undistorted) or undistort the images first."
            )
        return torch.tensor([[fx, 0.0, cx - 0.5], [0.0, fy, cy - 0.5], [0.0, 0.0, 1.0]], dtype=torch.float64)


@dataclass(frozen=True)
class ColmapImage:
    """A COLMAP image: ``image_id``, quaternion ``qvec`` (w, x, y, z), ``tvec``, ``camera_id``, ``name``."""

    image_id: int
    qvec: tuple[float, float, float, float]
    tvec: tuple[float, float, float]
    camera_id: int
    name: str

    def extrinsics(self) -> Tensor:
        """Camera-from-world ``[R(q) | t]`` ``[3, 4]`` (float64)."""
        rot = quaternion_to_matrix(torch.tensor(self.qvec, dtype=torch.float64))
        return torch.cat([rot, torch.tensor(self.tvec, dtype=torch.float64)[:, None]], dim=1)


def _data_lines(path: Path) -> list[str]:
    with open(require_file(path, "COLMAP text file")) as f:
        return [line.rstrip("\n") for line in f]


def read_colmap_cameras(path: Path) -> dict[int, ColmapCamera]:
    """Parse a COLMAP ``cameras.txt``."""
    cameras = {}
    for line in _data_lines(path):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            cameras[int(parts[0])] = ColmapCamera(parts[1], int(parts[2]), int(parts[3]), tuple(map(float, parts[4:])))
        except (IndexError, ValueError) as err:
            raise ValueError(f"malformed camera line in {path}: {line!r}") from err
    return cameras


def read_colmap_images(path: Path) -> list[ColmapImage]:
    """Parse a COLMAP ``images.txt`` (each image header is followed by a 2-D points line)."""
    lines = _data_lines(path)
    images, i = [], 0
    while i < len(lines):
        line = lines[i].strip()
        i += 1
        if not line or line.startswith("#"):
            continue
        parts = line.split()
        try:
            images.append(
                ColmapImage(
                    image_id=int(parts[0]),
                    qvec=tuple(map(float, parts[1:5])),
                    tvec=tuple(map(float, parts[5:8])),
                    camera_id=int(parts[8]),
                    name=" ".join(parts[9:]),
                )
            )
        except (IndexError, ValueError) as err:
            raise ValueError(f"malformed image line in {path}: {line!r}") from err
        i += 1  # the POINTS2D line (possibly empty) belongs to this image
    return images


def load_eth3d_depth(path: Path, height: int, width: int) -> Tensor:
    """Read a raw float32 ETH3D depth map ``[H, W]``; non-finite values become 0 (invalid)."""
    data = np.fromfile(require_file(path, "ETH3D ground-truth depth"), dtype="<f4")
    if data.size != height * width:
        raise ValueError(
            f"{path} holds {data.size} floats but the camera is {width}x{height}; depth and calibration do not match"
        )
    depth = data.reshape(height, width).astype(np.float32)
    depth[~np.isfinite(depth)] = 0.0
    return torch.from_numpy(depth)


class ETH3DDataset(FolderMultiViewDataset):
    """ETH3D scenes as multi-view samples (one sample per scene).

    Args:
        root: folder holding one sub-folder per scene.
        scenes: scene names to use; ``None`` = every folder with a calibration.
        num_views: frames per sample.
        image_size: output ``(H, W)``, multiples of 14.
        frame_selection: ``"uniform"`` or ``"random"`` (seeded).
        seed: seed of random frame selection.
        calibration_subdir: folder with ``cameras.txt`` / ``images.txt``.
        depth_subdir: folder holding depth maps at ``<depth_subdir>/<NAME>``.
        require_depth: raise when a depth map is missing (else its mask is empty).
    """

    def __init__(
        self,
        root: str | Path,
        scenes: Sequence[str] | None = None,
        num_views: int = 8,
        image_size: tuple[int, int] = (336, 504),
        frame_selection: str = "uniform",
        seed: int = 0,
        calibration_subdir: str = "dslr_calibration_undistorted",
        depth_subdir: str = "ground_truth_depth",
        require_depth: bool = True,
    ) -> None:
        super().__init__(num_views, image_size, frame_selection, seed)
        self.root = Path(root)
        self.calibration_subdir, self.depth_subdir = calibration_subdir, depth_subdir
        self.require_depth = require_depth
        names = self.available_scenes(self.root, calibration_subdir) if scenes is None else list(scenes)
        self._keep_scenes_with_enough_frames([(n, self._read_scene(n)) for n in names], self.root)
        log.info("ETH3D: %d scenes from %s", len(self.scenes), self.root)

    @staticmethod
    def available_scenes(root: str | Path, calibration_subdir: str = "dslr_calibration_undistorted") -> list[str]:
        """Scene folders under ``root`` that contain ``<calibration_subdir>/images.txt``."""
        names = sorted(p.parent.parent.name for p in Path(root).glob(f"*/{calibration_subdir}/images.txt"))
        if not names:
            raise FileNotFoundError(f"no <scene>/{calibration_subdir}/images.txt under {root}; is it an ETH3D root?")
        return names

    def _read_scene(self, scene: str) -> list[FrameRecord]:
        calib = self.root / scene / self.calibration_subdir
        cameras = read_colmap_cameras(calib / "cameras.txt")
        frames = []
        for image in sorted(read_colmap_images(calib / "images.txt"), key=lambda im: im.name):
            if image.camera_id not in cameras:
                raise ValueError(f"{calib / 'images.txt'}: image {image.name} uses unknown camera {image.camera_id}")
            cam = cameras[image.camera_id]
            frames.append(
                FrameRecord(
                    image_path=self.root / scene / "images" / image.name,
                    extrinsics=image.extrinsics().float(),
                    intrinsics=cam.intrinsics().float(),
                    camera_grid_hw=(cam.height, cam.width),
                    depth_path=self.root / scene / self.depth_subdir / image.name,
                )
            )
        return frames

    def load_depth(self, frame: FrameRecord) -> tuple[Tensor | None, Tensor | None]:
        if frame.depth_path is None or (not frame.depth_path.is_file() and not self.require_depth):
            return None, None
        return load_eth3d_depth(frame.depth_path, *frame.camera_grid_hw), None
