"""Patch embedding of VGGT: DINOv2 ViT with or without register tokens (or a plain strided conv).

DINOv2 (with ``R >= 0`` registers) on an image ``[N, 3, H, W]`` (``h = H/p``, ``w = W/p`` patches)::

    t = [cls + e_0 ; Conv_p(x) + Interp(E)] ∈ R^{N × (1+hw) × C}      (learned e_0, E ∈ R^{M×M×C})
    t = [t_0 ; r_1..r_R ; t_1..t_hw]                                    (R register tokens, no pos. emb.)
    t = Block_L(...Block_1(t)),  out = LN(t)[:, 1+R:]                   -> [N, hw, C]

``Interp`` resizes the ``M × M`` grid of the learned position embedding (``M = 37`` for
the 518 px training size) to ``h × w`` with bicubic interpolation in float32 (no scale offset),
antialiased for the official DINOv2-reg models and plain for a transformers ``Dinov2Model``
(``interp_antialias``), and is skipped when ``h = w = M``.  With ``R = 0`` (DINOv2 without
registers) there is no ``register_tokens`` parameter, as in those checkpoints.  Blocks are pre-norm with
LayerScale, LayerNorm eps 1e-6, no qk-norm and no RoPE.  Only the final-norm patch tokens
leave the module; ``mask_token`` exists for checkpoint compatibility and is unused.

timm's ``vit_large_patch14_reg4_dinov2`` is the same network; ``models.vggt.convert.
timm_dinov2_to_patch_embed`` maps its weights onto this module, ``hf_dinov2_to_patch_embed``
those of a transformers ``Dinov2Model`` (e.g. the real DINOv2-S/14, no registers).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.vggt.layers import Block


class PatchConv(nn.Module):
    """``[N, 3, H, W] -> [N, (H/p)(W/p), C]`` with one ``p × p`` stride-``p`` convolution."""

    def __init__(self, patch_size: int, embed_dim: int, in_chans: int = 3) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class DinoV2PatchEmbed(nn.Module):
    """DINOv2 ViT (with or without registers) returning final-norm patch tokens ``[N, hw, C]``.

    Args:
        img_size: training image size (sets the ``pos_embed`` grid ``img_size / patch_size``).
        patch_size: patch size ``p``.
        embed_dim: width ``C``.
        depth / num_heads / mlp_ratio: transformer sizes.
        num_register_tokens: ``R`` register tokens (0: none, and no ``register_tokens`` parameter).
        init_values: LayerScale init.
        interp_antialias: antialiased (official DINOv2-reg) or plain (transformers) bicubic grid resizing.
    """

    def __init__(
        self,
        img_size: int = 518,
        patch_size: int = 14,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_register_tokens: int = 4,
        init_values: float = 1.0,
        interp_antialias: bool = True,
    ) -> None:
        super().__init__()
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.num_register_tokens = num_register_tokens
        self.interp_antialias = interp_antialias
        self.patch_embed = PatchConv(patch_size, embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.grid_size**2 + 1, embed_dim))
        if num_register_tokens:
            self.register_tokens = nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim))
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                Block(embed_dim, num_heads, mlp_ratio, qk_norm=False, init_values=init_values, norm_eps=1e-6)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self._init_weights()

    def _init_weights(self) -> None:
        if self.pos_embed.is_meta:
            return
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)
        if self.num_register_tokens:
            nn.init.normal_(self.register_tokens, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)
                nn.init.zeros_(module.bias)

    def interpolate_pos_embed(self, h: int, w: int) -> Tensor:
        """Position embedding ``[1, 1 + h*w, C]`` for an ``h × w`` patch grid."""
        M = self.grid_size
        if h == M and w == M:
            return self.pos_embed
        dtype = self.pos_embed.dtype
        pos = self.pos_embed.float()
        grid = pos[:, 1:].reshape(1, M, M, -1).permute(0, 3, 1, 2)
        grid = F.interpolate(grid, size=(h, w), mode="bicubic", align_corners=False, antialias=self.interp_antialias)
        grid = grid.permute(0, 2, 3, 1).reshape(1, h * w, -1)
        return torch.cat([pos[:, :1], grid], dim=1).to(dtype)

    def forward(self, images: Tensor) -> Tensor:
        """``images [N, 3, H, W]`` (normalised) -> patch tokens ``[N, (H/p)(W/p), C]``."""
        N, _, H, W = images.shape
        h, w = H // self.patch_size, W // self.patch_size
        x = self.patch_embed(images)
        x = torch.cat([self.cls_token.expand(N, -1, -1), x], dim=1)
        x = x + self.interpolate_pos_embed(h, w)
        if self.num_register_tokens:
            x = torch.cat([x[:, :1], self.register_tokens.expand(N, -1, -1), x[:, 1:]], dim=1)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)[:, 1 + self.num_register_tokens :]
