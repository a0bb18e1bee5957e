"""``VisionEncoder``: a transformers ViT behind one interface, images in [0, 1] in, features out.

    x̂ = (x - μ) / σ                       per channel (ImageNet μ, σ for DINOv2; OpenAI's for CLIP)
    tokens = ViT(x̂)                       [B, 1 + N, C]   (DINOv2: after the final LayerNorm;
                                                            CLIP: the encoder output)
    pooled = tokens[:, 0] after the norm   [B, C]          (DINOv2: the CLS token)
           = P · LN(tokens[:, 0])          [B, D]          (CLIP: the 512-d image embedding)

Grey images (one channel) are repeated to three.  Sides must be multiples of the patch size; CLIP at a
side other than its training size interpolates its position grid (``interpolate_pos_encoding``), DINOv2
always does.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class VisionEncoder(nn.Module):
    """Wraps ``Dinov2Model`` (``kind="dinov2"``) or ``CLIPVisionModelWithProjection`` (``kind="clip"``).

    Args:
        model: the transformers model (its Linear layers are what compression targets, under ``model.``).
        kind: ``"dinov2"`` or ``"clip"``.
        mean, std: per-channel normalisation of [0, 1] input.
    """

    def __init__(self, model: nn.Module, kind: str, mean: tuple[float, ...], std: tuple[float, ...]) -> None:
        super().__init__()
        if kind not in ("dinov2", "clip"):
            raise ValueError(f"kind must be 'dinov2' or 'clip', got {kind!r}")
        self.model = model
        self.kind = kind
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    @property
    def patch_size(self) -> int:
        return int(self.model.config.patch_size)

    @property
    def feature_dim(self) -> int:
        cfg = self.model.config
        return int(cfg.projection_dim if self.kind == "clip" else cfg.hidden_size)

    def normalize(self, images: Tensor) -> Tensor:
        """``[B, 1|3, H, W]`` in [0, 1] -> normalised ``[B, 3, H, W]`` (checks the side lengths)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3):
            raise ValueError(f"expected images [B, 1 or 3, H, W], got shape {tuple(images.shape)}")
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image sides {h}x{w} must be multiples of the patch size {self.patch_size}")
        if images.shape[1] == 1:
            images = images.expand(-1, 3, -1, -1)
        return (images.to(self.mean.dtype) - self.mean) / self.std

    def encode(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pooled [B, D], tokens [B, 1 + N, C])`` (module docstring)."""
        x = self.normalize(images)
        if self.kind == "dinov2":
            out = self.model(pixel_values=x)
            return out.pooler_output, out.last_hidden_state
        native = int(self.model.config.image_size)
        out = self.model(pixel_values=x, interpolate_pos_encoding=tuple(x.shape[-2:]) != (native, native))
        return out.image_embeds, out.last_hidden_state

    def forward(self, images: Tensor) -> Tensor:
        """Pooled features ``[B, D]``."""
        return self.encode(images)[0]
