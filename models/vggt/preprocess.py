"""Image preprocessing for VGGT, pixel-identical to the official ``load_and_preprocess_images``.

The public model expects RGB in [0, 1] with a width of 518 px and sides that are
multiples of 14::

    crop: W' = T, H' = 14·round(H·T / (14 W)); centre-crop H' to T if H' > T
    pad:  the longer side -> T, the other -> 14·round(side·T / (14·longer)); pad to T × T with 1.0

(``T = target_size``).  The official code resizes an 8-bit PIL image with ``Image.BICUBIC``:
PIL resamples separably (a horizontal then a vertical pass, each an antialiased cubic
convolution, ``a = -0.5``, support widened by the downscale factor) in fixed point and rounds
to uint8 after each pass.  A single float pass (``F.interpolate(..., antialias=True)``) differs
from it by up to ~18/255 on noisy images, so this module calls PIL itself: every image becomes
an 8-bit RGB PIL image first (RGBA composited on white with ``Image.alpha_composite`` and grey
converted with ``convert("RGB")``, as the official code does; float input in [0, 1] is rounded
to 8 bits, ``round(255·x)``, at most 0.5/255 away), is resized by PIL, and is divided by 255.
If the resulting sizes differ (crop mode, mixed aspect ratios) every image is padded
with white to the largest height and width so the batch stacks.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)


def _to_uint8_hwc(image: Any) -> np.ndarray:
    """Tensor or array (uint8, or float in [0, 1]; ``[C, H, W]`` or ``[H, W, C]``) -> uint8 ``[H, W, C]``."""
    t = torch.from_numpy(np.ascontiguousarray(image)) if isinstance(image, np.ndarray) else image
    if t.dim() == 2:
        t = t[None]
    if t.dim() != 3:
        raise ValueError(f"expected an image [C, H, W] (or [H, W, C] array), got shape {tuple(t.shape)}")
    if t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # channels-last array
    if t.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected 1, 3 or 4 channels, got shape {tuple(t.shape)}")
    if t.is_floating_point():
        if t.numel() and (t.min() < 0 or t.max() > 1):
            raise ValueError("float images must lie in [0, 1]; divide uint8 data by 255 first")
        t = (t.double() * 255).round().to(torch.uint8)
    elif t.dtype != torch.uint8:
        raise TypeError(f"unsupported image dtype {t.dtype}; use uint8 or float in [0, 1]")
    return t.permute(1, 2, 0).contiguous().numpy()


def _to_pil_rgb(image: Any):
    """PIL image, numpy array or tensor -> 8-bit RGB PIL image, composited and converted as the official code."""
    from PIL import Image

    if not isinstance(image, Image.Image):
        if not isinstance(image, Tensor | np.ndarray):
            raise TypeError(f"unsupported image type {type(image).__name__}; pass PIL images or [C, H, W] tensors")
        arr = _to_uint8_hwc(image)
        image = Image.fromarray(arr[..., 0] if arr.shape[-1] == 1 else arr, mode={1: "L", 3: "RGB", 4: "RGBA"}[
            arr.shape[-1]])
    if image.mode == "RGBA":
        background = Image.new("RGBA", image.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, image)
    return image.convert("RGB")


def _bicubic():
    from PIL import Image

    return Image.Resampling.BICUBIC


def _target_hw(h: int, w: int, mode: str, target: int, multiple: int) -> tuple[int, int]:
    if mode == "pad" and h > w:
        return target, round(w * (target / h) / multiple) * multiple
    return round(h * (target / w) / multiple) * multiple, target


def _pad_to(img: Tensor, height: int, width: int, value: float = 1.0) -> Tensor:
    dh, dw = height - img.shape[1], width - img.shape[2]
    if dh <= 0 and dw <= 0:
        return img
    top, left = dh // 2, dw // 2
    return F.pad(img, (left, dw - left, top, dh - top), mode="constant", value=value)


def preprocess_images(
    images: Sequence[Any] | Tensor, mode: str = "crop", target_size: int = 518, patch_size: int = 14
) -> Tensor:
    """Resize / crop / pad images for VGGT.

    Args:
        images: a list of PIL images, ``[C, H, W]`` tensors (uint8, or float in [0, 1], rounded
            to 8 bits) or ``[H, W, C]`` uint8 arrays; or one ``[N, C, H, W]`` tensor.
        mode: ``"crop"`` (width = target, centre-crop tall images) or ``"pad"`` (longer
            side = target, pad to a square).
        target_size: output width (crop) or square side (pad); a multiple of ``patch_size``.
        patch_size: output sides are multiples of this.

    Returns:
        ``[N, 3, H, W]`` float32 in [0, 1] (add a batch dim for ``VGGT``: ``x[None]``).
    """
    if mode not in ("crop", "pad"):
        raise ValueError(f"mode must be 'crop' or 'pad', got {mode!r}")
    if target_size % patch_size != 0 or target_size <= 0:
        raise ValueError(f"target_size ({target_size}) must be a positive multiple of patch_size ({patch_size})")
    if isinstance(images, Tensor) and images.dim() == 4:
        images = list(images)
    if isinstance(images, Tensor | str) or len(images) == 0:
        raise ValueError("pass a non-empty list of images (or an [N, C, H, W] tensor)")

    out = []
    for image in images:
        pil = _to_pil_rgb(image)
        w, h = pil.size
        new_h, new_w = _target_hw(h, w, mode, target_size, patch_size)
        if new_h < patch_size or new_w < patch_size:
            raise ValueError(f"image {h}x{w} is too elongated: it would resize to {new_h}x{new_w}")
        resized = np.asarray(pil.resize((new_w, new_h), _bicubic()))
        img = torch.from_numpy(resized.copy()).permute(2, 0, 1).float() / 255.0
        if mode == "crop" and new_h > target_size:
            top = (new_h - target_size) // 2
            img = img[:, top : top + target_size]
        if mode == "pad":
            img = _pad_to(img, target_size, target_size)
        out.append(img)

    shapes = {tuple(i.shape[1:]) for i in out}
    if len(shapes) > 1:
        max_h, max_w = max(s[0] for s in shapes), max(s[1] for s in shapes)
        logger.warning("images have different shapes %s; padding all to %dx%d with white", shapes, max_h, max_w)
        out = [_pad_to(i, max_h, max_w) for i in out]
    return torch.stack(out)
