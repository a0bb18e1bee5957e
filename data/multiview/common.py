"""Shared pieces of the multi-view loaders: resize/crop with intrinsics, file reading, samples.

Resize-then-centre-crop ("cover") to a target ``(H, W)`` that VGGT accepts (multiples of
14).  With a source grid ``(h, w)`` and uniform scale ``s = max(H/h, W/w)`` the image is
resized to ``(h1, w1) = (round(h s), round(w s))`` (per-axis scales ``sy = h1/h``,
``sx = w1/w``) and cropped at ``(top, left)``.  Under the pixel-centre convention of
:mod:`data.multiview.geometry` (pixel ``i`` covers ``[i - 1/2, i + 1/2]``) the
intrinsics become::

    fx' = sx fx        cx' = sx (cx + 1/2) - 1/2 - left
    fy' = sy fy        cy' = sy (cy + 1/2) - 1/2 - top

Images are resampled bilinearly with antialiasing; depth and validity masks with
``nearest-exact`` (half-pixel aligned nearest neighbour), so depth values are never
blended across discontinuities.  Arrays of a different resolution but the same field of
view as the grid the intrinsics describe (e.g. DTU depth maps at 1/4 of the image) are
resampled to the same ``(h1, w1)`` grid, which keeps them aligned.

A sample is a dict with ``images [S,3,H,W]`` in [0, 1], ``depths [S,H,W]``,
``masks [S,H,W]`` bool, ``world_points [S,H,W,3]``, ``extrinsics [S,3,4]``,
``intrinsics [S,3,3]`` (all float32) and ``scene`` (str).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torch.utils.data import Dataset

from data.multiview.geometry import backproject_depth

PATCH = 14


def check_image_size(image_size: tuple[int, int]) -> tuple[int, int]:
    """Validate a target ``(H, W)``: positive multiples of 14 (VGGT's patch size)."""
    height, width = (int(x) for x in image_size)
    if height <= 0 or width <= 0 or height % PATCH or width % PATCH:
        raise ValueError(
            f"image_size must be (H, W) with both positive multiples of {PATCH}, got {image_size}; "
            f"e.g. use ({PATCH * round(max(height, PATCH) / PATCH)}, {PATCH * round(max(width, PATCH) / PATCH)})."
        )
    return height, width


def check_num_views(num_views: int) -> int:
    """Validate ``num_views``: an integer >= 2.  VGGT predicts every camera relative to the first
    view and its camera metrics score view pairs, so one view is not a multi-view sample."""
    if isinstance(num_views, bool) or int(num_views) != num_views or num_views < 2:
        raise ValueError(f"num_views must be an integer >= 2 (views per sample; cameras are predicted relative to "
                         f"the first view and scored in pairs), got {num_views!r}; e.g. num_views: 8")
    return int(num_views)


@dataclass(frozen=True)
class ResizeCrop:
    """Cover-resize of a ``src`` grid to ``resized`` then a crop of ``dst`` at ``(top, left)``."""

    src: tuple[int, int]
    resized: tuple[int, int]
    top: int
    left: int
    dst: tuple[int, int]

    @classmethod
    def cover(cls, src_hw: tuple[int, int], dst_hw: tuple[int, int]) -> ResizeCrop:
        """Smallest uniform scaling of ``src_hw`` covering ``dst_hw``, then a centre crop."""
        (h, w), (dh, dw) = src_hw, dst_hw
        scale = max(dh / h, dw / w)
        rh, rw = max(dh, round(h * scale)), max(dw, round(w * scale))
        return cls(src=(h, w), resized=(rh, rw), top=(rh - dh) // 2, left=(rw - dw) // 2, dst=(dh, dw))

    def intrinsics(self, intrinsics: Tensor) -> Tensor:
        """Map ``[..., 3, 3]`` intrinsics defined on the ``src`` grid to the ``dst`` grid."""
        sy, sx = self.resized[0] / self.src[0], self.resized[1] / self.src[1]
        k = intrinsics.clone()
        k[..., 0, 0] = intrinsics[..., 0, 0] * sx
        k[..., 1, 1] = intrinsics[..., 1, 1] * sy
        k[..., 0, 2] = sx * (intrinsics[..., 0, 2] + 0.5) - 0.5 - self.left
        k[..., 1, 2] = sy * (intrinsics[..., 1, 2] + 0.5) - 0.5 - self.top
        return k

    def apply(self, array: Tensor, kind: str) -> Tensor:
        """Resample ``array`` (``[C, h, w]`` image or ``[h, w]`` depth/mask) to ``dst``.

        ``array`` may have any resolution whose aspect ratio matches ``src`` (same field of
        view).  ``kind`` is ``"image"`` (bilinear, antialiased) or ``"nearest"``.
        """
        h, w = array.shape[-2:]
        if abs(h / w - self.src[0] / self.src[1]) > 0.02:
            raise ValueError(
                f"array of size {(h, w)} does not share the aspect ratio of the camera grid {self.src}; "
                "a depth map or mask must cover the same field of view as the image."
            )
        x = array[None] if array.dim() == 3 else array[None, None]
        dtype = x.dtype
        if (h, w) != self.resized:
            if kind == "image":
                x = F.interpolate(x.float(), size=self.resized, mode="bilinear", antialias=True, align_corners=False)
            elif kind == "nearest":
                x = F.interpolate(x.float(), size=self.resized, mode="nearest-exact").to(dtype)
            else:
                raise ValueError(f"kind must be 'image' or 'nearest', got {kind!r}")
        x = x[..., self.top : self.top + self.dst[0], self.left : self.left + self.dst[1]]
        return x[0] if array.dim() == 3 else x[0, 0]


def require_file(path: Path, what: str) -> Path:
    """Return ``path`` or raise ``FileNotFoundError`` naming the missing ``what``."""
    if not path.is_file():
        raise FileNotFoundError(f"missing {what}: {path} (check the dataset root and its directory layout)")
    return path


def load_rgb(path: Path) -> Tensor:
    """Read an image file as float RGB ``[3, H, W]`` in [0, 1]."""
    with Image.open(require_file(path, "image")) as im:
        arr = np.asarray(im.convert("RGB"), dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def load_binary_mask(path: Path) -> Tensor:
    """Read a PNG mask as bool ``[H, W]`` (any non-zero pixel is True)."""
    with Image.open(require_file(path, "mask")) as im:
        arr = np.asarray(im.convert("L"))
    return torch.from_numpy(arr > 0)


def select_frames(num_available: int, num_views: int, mode: str, generator: torch.Generator) -> list[int]:
    """Pick ``num_views`` distinct frame indices out of ``num_available``.

    ``mode="uniform"``: evenly spaced over the sequence; ``"random"``: a random subset in
    increasing order drawn with ``generator``.
    """
    if num_available < num_views:
        raise ValueError(f"a scene has {num_available} frames but num_views={num_views}; lower num_views.")
    if mode == "uniform":
        if num_views == 1:
            return [0]
        return [round(i * (num_available - 1) / (num_views - 1)) for i in range(num_views)]
    if mode == "random":
        return sorted(torch.randperm(num_available, generator=generator)[:num_views].tolist())
    raise ValueError(f"frame selection must be 'uniform' or 'random', got {mode!r}")


def prepare_view(
    image: Tensor,
    depth: Tensor | None,
    valid: Tensor | None,
    intrinsics: Tensor,
    camera_grid_hw: tuple[int, int],
    image_size: tuple[int, int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Resize/crop one view to ``image_size``.

    Args:
        image: ``[3, h, w]``; depth: ``[h', w']`` z-depth or ``None``; valid: ``[h', w']``
            bool or ``None`` (then ``depth > 0`` and finite).
        intrinsics: ``[3, 3]`` defined on ``camera_grid_hw``.
        camera_grid_hw: the pixel grid the intrinsics refer to.

    Returns:
        ``image [3,H,W]``, ``depth [H,W]`` (0 where invalid), ``mask [H,W]``, ``K [3,3]``.
    """
    rc = ResizeCrop.cover(camera_grid_hw, image_size)
    image = rc.apply(image, "image").clamp(0.0, 1.0)
    if depth is None:
        depth_out = torch.zeros(image_size)
        mask = torch.zeros(image_size, dtype=torch.bool)
    else:
        ok = torch.isfinite(depth) & (depth > 0)
        if valid is not None:
            ok &= valid
        depth = torch.where(ok, depth, torch.zeros_like(depth))
        depth_out = rc.apply(depth.float(), "nearest")
        mask = rc.apply(ok, "nearest") & (depth_out > 0)
    return image, depth_out, mask, rc.intrinsics(intrinsics.float())


def make_sample(
    images: list[Tensor],
    depths: list[Tensor],
    masks: list[Tensor],
    intrinsics: list[Tensor],
    extrinsics: list[Tensor],
    scene: str,
) -> dict:
    """Stack per-view tensors into a sample; world points are back-projected from depth.

    World points are computed in float64 then stored as float32; invalid pixels hold 0.
    """
    depth = torch.stack(depths).float()
    mask = torch.stack(masks)
    k = torch.stack(intrinsics).float()
    e = torch.stack(extrinsics).float()
    points = backproject_depth(depth.double(), k.double(), e.double()).float()
    points = torch.where(mask[..., None], points, torch.zeros_like(points))
    return {
        "images": torch.stack(images).float(),
        "depths": torch.where(mask, depth, torch.zeros_like(depth)),
        "masks": mask,
        "world_points": points,
        "extrinsics": e,
        "intrinsics": k,
        "scene": scene,
    }


def seed_for(*parts: int) -> int:
    """Deterministic 63-bit seed from integers (splitmix64-style mixing, platform independent)."""
    state = 0x9E3779B97F4A7C15
    mask = (1 << 64) - 1
    for part in parts:
        state = (state ^ (int(part) & mask)) * 0xBF58476D1CE4E5B9 & mask
        state = (state ^ (state >> 31)) * 0x94D049BB133111EB & mask
        state ^= state >> 29
    return state & ((1 << 63) - 1)


def fov_to_focal(fov_rad: float, size: int) -> float:
    """Focal length in pixels for a field of view spanning ``size`` pixels."""
    return size / 2.0 / math.tan(fov_rad / 2.0)


@dataclass
class FrameRecord:
    """One frame of a real dataset: paths plus OpenCV cameras.

    ``intrinsics [3,3]`` refer to the pixel grid ``camera_grid_hw``; ``extrinsics [3,4]``
    are camera-from-world.  ``extra`` holds format-specific fields (e.g. depth scale).
    """

    image_path: Path
    extrinsics: Tensor
    intrinsics: Tensor
    camera_grid_hw: tuple[int, int]
    depth_path: Path | None = None
    extra: dict = field(default_factory=dict)


class FolderMultiViewDataset(Dataset):
    """Base of the on-disk loaders: one sample = ``num_views`` frames of one scene.

    Subclasses fill ``self.scenes`` with ``(scene_id, [FrameRecord, ...])`` and implement
    :meth:`load_depth`.  Frame choice is ``"uniform"`` (evenly spaced) or ``"random"``
    (seeded by ``(seed, index)``, so a given index always yields the same frames).
    """

    def __init__(self, num_views: int, image_size: tuple[int, int], frame_selection: str, seed: int) -> None:
        if frame_selection not in ("uniform", "random"):
            raise ValueError(f"frame_selection must be 'uniform' or 'random', got {frame_selection!r}")
        self.num_views = check_num_views(num_views)
        self.image_size = check_image_size(image_size)
        self.frame_selection, self.seed = frame_selection, seed
        self.scenes: list[tuple[str, list[FrameRecord]]] = []

    def _keep_scenes_with_enough_frames(self, scenes: list[tuple[str, list[FrameRecord]]], where: Path) -> None:
        self.scenes = [(name, frames) for name, frames in scenes if len(frames) >= self.num_views]
        if not self.scenes:
            raise ValueError(
                f"no scene under {where} has at least num_views={self.num_views} frames "
                f"(found {len(scenes)} scene(s)); lower num_views or check the root/scene filters."
            )

    @property
    def scene_ids(self) -> list[str]:
        """Identifiers of the scenes, in index order."""
        return [name for name, _ in self.scenes]

    def __len__(self) -> int:
        return len(self.scenes)

    def load_depth(self, frame: FrameRecord) -> tuple[Tensor | None, Tensor | None]:
        """Return ``(depth [h,w] z-depth or None, extra validity [h,w] bool or None)``."""
        raise NotImplementedError

    def __getitem__(self, index: int) -> dict:
        name, frames = self.scenes[index]
        g = torch.Generator().manual_seed(seed_for(self.seed, index))
        chosen = select_frames(len(frames), self.num_views, self.frame_selection, g)
        images, depths, masks, ks, es = [], [], [], [], []
        for i in chosen:
            frame = frames[i]
            depth, valid = self.load_depth(frame)
            image, depth, mask, k = prepare_view(
                load_rgb(frame.image_path), depth, valid, frame.intrinsics, frame.camera_grid_hw, self.image_size
            )
            images.append(image)
            depths.append(depth)
            masks.append(mask)
            ks.append(k)
            es.append(frame.extrinsics.float())
        return make_sample(images, depths, masks, ks, es, name)
