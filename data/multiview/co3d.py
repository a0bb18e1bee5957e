"""CO3Dv2 loader (Common Objects in 3D, v2 directory format).

On-disk layout (paths inside annotations are relative to the dataset root)::

    <root>/<category>/frame_annotations.jgz          gzip JSON: list of frame annotations
    <root>/<category>/<sequence>/images/frameXXXXXX.jpg
    <root>/<category>/<sequence>/depths/frameXXXXXX.jpg.geometric.png
    <root>/<category>/<sequence>/depth_masks/frameXXXXXX.png

A frame annotation has ``sequence_name``, ``frame_number``, ``image: {path, size: [H, W]}``,
``depth: {path, scale_adjustment, mask_path}`` and ``viewpoint: {R, T, focal_length,
principal_point, intrinsics_format}``.  Depth PNGs are 16-bit images whose bits are
IEEE float16 values; metric-consistent depth is ``float16_bits_as_float * scale_adjustment``
(0 / non-finite = invalid), further restricted by the binary depth mask.

Camera conversion, PyTorch3D NDC -> OpenCV pixels (the classic trap).  PyTorch3D uses
row vectors, ``X_p3d = X_world R + T``, in a camera frame with +x left, +y up, +z forward;
OpenCV has +x right, +y down.  With ``F = diag(-1, -1, 1)``::

    R_cv = F Rᵀ,   t_cv = F T.

Intrinsics in ``"ndc_isotropic"`` (CO3Dv2) use the half short side ``s = min(H, W) / 2``
for both axes (``"ndc_norm_image_bounds"``, CO3Dv1, uses ``s_x = W/2``, ``s_y = H/2``)::

    fx = f_x s_x,   fy = f_y s_y,
    cx = W/2 - p_x s_x - 1/2,   cy = H/2 - p_y s_y - 1/2.

The ``- 1/2`` moves from PyTorch3D's continuous screen coordinates (image spans ``[0, W]``,
pixel centre at ``i + 1/2``; it is what ``pytorch3d.utils.opencv_from_cameras_projection``
returns) to our integer-pixel-centre convention: a PyTorch3D pixel centre
``x_ndc = (W - 2i - 1) / (2 s)`` projects to ``i`` exactly with these formulas.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import Tensor

from data.multiview.common import FolderMultiViewDataset, FrameRecord, load_binary_mask, require_file

log = logging.getLogger(__name__)

_FLIP_XY = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))


def co3d_viewpoint_to_opencv(viewpoint: dict, image_hw: tuple[int, int]) -> tuple[Tensor, Tensor]:
    """CO3D ``viewpoint`` dict + original image ``(H, W)`` -> OpenCV ``extrinsics [3,4]``, ``K [3,3]``.

    See the module docstring for the formulas.
    """
    try:
        rot = torch.tensor(viewpoint["R"], dtype=torch.float64)
        trans = torch.tensor(viewpoint["T"], dtype=torch.float64)
        focal = torch.tensor(viewpoint["focal_length"], dtype=torch.float64).reshape(-1).expand(2)
        principal = torch.tensor(viewpoint["principal_point"], dtype=torch.float64)
    except KeyError as err:
        raise KeyError(f"CO3D viewpoint lacks the field {err}; expected R, T, focal_length, principal_point") from err
    fmt = viewpoint.get("intrinsics_format", "ndc_isotropic")
    height, width = image_hw
    if fmt == "ndc_isotropic":
        sx = sy = min(height, width) / 2.0
    elif fmt == "ndc_norm_image_bounds":
        sx, sy = width / 2.0, height / 2.0
    else:
        raise ValueError(
            f"unsupported CO3D intrinsics_format {fmt!r}; expected 'ndc_isotropic' or 'ndc_norm_image_bounds'"
        )
    k = torch.eye(3, dtype=torch.float64)
    k[0, 0], k[1, 1] = focal[0] * sx, focal[1] * sy
    k[0, 2] = width / 2.0 - principal[0] * sx - 0.5
    k[1, 2] = height / 2.0 - principal[1] * sy - 0.5
    extrinsics = torch.cat([_FLIP_XY @ rot.T, (_FLIP_XY @ trans)[:, None]], dim=1)
    return extrinsics, k


def load_co3d_depth(path: Path, scale_adjustment: float = 1.0) -> Tensor:
    """Read a CO3D depth PNG (16-bit PNG holding float16 bit patterns) as float ``[H, W]``."""
    with Image.open(require_file(path, "CO3D depth map")) as im:
        bits = np.array(im, dtype=np.uint16)
    depth = bits.view(np.float16).astype(np.float32) * float(scale_adjustment)
    depth[~np.isfinite(depth)] = 0.0
    return torch.from_numpy(depth)


class CO3DDataset(FolderMultiViewDataset):
    """CO3Dv2 sequences as multi-view samples (one sample per sequence).

    Args:
        root: dataset root holding ``<category>/frame_annotations.jgz``.
        categories: categories to use; ``None`` = every folder with annotations.
        sequences: optional ``"<category>/<sequence>"`` ids to keep (e.g. one split).
        num_views: frames per sample.
        image_size: output ``(H, W)``, multiples of 14 (cover-resize + centre crop).
        frame_selection: ``"uniform"`` or ``"random"`` (seeded).
        seed: seed of random frame selection.
        require_depth: raise if a frame has no depth annotation (else its mask is empty).
    """

    def __init__(
        self,
        root: str | Path,
        categories: Sequence[str] | None = None,
        sequences: Sequence[str] | None = None,
        num_views: int = 8,
        image_size: tuple[int, int] = (224, 224),
        frame_selection: str = "uniform",
        seed: int = 0,
        require_depth: bool = True,
    ) -> None:
        super().__init__(num_views, image_size, frame_selection, seed)
        self.root = Path(root)
        self.require_depth = require_depth
        keep = None if sequences is None else set(sequences)
        scenes = []
        for category in self.list_categories(self.root) if categories is None else list(categories):
            for name, frames in self._read_category(category).items():
                if keep is None or name in keep:
                    scenes.append((name, frames))
        self._keep_scenes_with_enough_frames(sorted(scenes, key=lambda s: s[0]), self.root)
        log.info("CO3D: %d sequences from %s", len(self.scenes), self.root)

    @staticmethod
    def list_categories(root: Path) -> list[str]:
        """Categories under ``root`` (folders containing ``frame_annotations.jgz``)."""
        cats = sorted(p.parent.name for p in Path(root).glob("*/frame_annotations.jgz"))
        if not cats:
            raise FileNotFoundError(f"no <category>/frame_annotations.jgz found under {root}; is it a CO3Dv2 root?")
        return cats

    @classmethod
    def available_scenes(cls, root: str | Path, categories: Sequence[str] | None = None) -> list[str]:
        """All ``"<category>/<sequence>"`` ids (sorted), without loading images."""
        root = Path(root)
        names = []
        for category in cls.list_categories(root) if categories is None else categories:
            with gzip.open(require_file(root / category / "frame_annotations.jgz", "CO3D annotations"), "rt") as f:
                names.extend({f"{category}/{a['sequence_name']}" for a in json.load(f)})
        return sorted(names)

    def _read_category(self, category: str) -> dict[str, list[FrameRecord]]:
        path = require_file(self.root / category / "frame_annotations.jgz", "CO3D frame annotations")
        with gzip.open(path, "rt") as f:
            annotations = json.load(f)
        by_seq: dict[str, list[tuple[int, FrameRecord]]] = {}
        for ann in annotations:
            try:
                image_hw = (int(ann["image"]["size"][0]), int(ann["image"]["size"][1]))
                extrinsics, k = co3d_viewpoint_to_opencv(ann["viewpoint"], image_hw)
                depth = ann.get("depth") or {}
                record = FrameRecord(
                    image_path=self.root / ann["image"]["path"],
                    extrinsics=extrinsics.float(),
                    intrinsics=k.float(),
                    camera_grid_hw=image_hw,
                    depth_path=self.root / depth["path"] if depth.get("path") else None,
                    extra={
                        "scale_adjustment": float(depth.get("scale_adjustment", 1.0) or 1.0),
                        "mask_path": self.root / depth["mask_path"] if depth.get("mask_path") else None,
                    },
                )
                key = f"{category}/{ann['sequence_name']}"
                by_seq.setdefault(key, []).append((int(ann["frame_number"]), record))
            except (KeyError, TypeError, IndexError) as err:
                raise ValueError(f"malformed frame annotation in {path}: {err!r}") from err
        return {name: [r for _, r in sorted(items, key=lambda x: x[0])] for name, items in by_seq.items()}

    def load_depth(self, frame: FrameRecord) -> tuple[Tensor | None, Tensor | None]:
        if frame.depth_path is None:
            if self.require_depth:
                raise FileNotFoundError(f"no depth annotation for {frame.image_path}; pass require_depth=False")
            return None, None
        depth = load_co3d_depth(frame.depth_path, frame.extra["scale_adjustment"])
        mask_path = frame.extra.get("mask_path")
        valid = load_binary_mask(mask_path) if mask_path is not None else None
        return depth, valid
