"""VGGT aggregator: patch embedding, camera/register tokens, alternating attention.

For images ``I ∈ [0,1]^{B×S×3×H×W}`` (``h = H/p``, ``w = W/p``, ``P = 1 + R + hw``)::

    x = DINOv2((I - μ) / σ)                          [B·S, hw, C]   (ImageNet μ, σ)
    t = [c_s ; r_s,1..R ; x]                         [B·S, P, C]    c_s, r_s: slot 0 for frame 0, slot 1 else
    for i in 0..depth-1:
        t = FrameBlock_i(t)   over [B·S, P, C]       (attention within each image)
        f_i = t
        t = GlobalBlock_i(t)  over [B, S·P, C]       (attention across all frames)
        out_i = concat(f_i, t)                       [B, S, P, 2C]

Both block kinds use qk-norm and 2-D RoPE on the patch grid (special tokens at (0, 0));
global attention reuses each frame's positions.  Only the layers that the heads ask for
(``keep_layers``) are stored, the others are returned as ``None`` to save memory.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from models.vggt.config import VGGTConfig
from models.vggt.layers import Block, grid_positions, rope_tables
from models.vggt.patch_embed import DinoV2PatchEmbed, PatchConv

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def frame_slot_tokens(token: Tensor, B: int, S: int) -> Tensor:
    """Expand ``token [1, 2, X, C]`` to ``[B·S, X, C]``: slot 0 for frame 0, slot 1 for the rest."""
    first = token[:, :1].expand(B, 1, *token.shape[2:])
    others = token[:, 1:].expand(B, S - 1, *token.shape[2:])
    return torch.cat([first, others], dim=1).reshape(B * S, *token.shape[2:])


class Aggregator(nn.Module):
    """Alternating frame/global attention over ``[B, S, 3, H, W]`` images (see module docstring)."""

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        c = config
        self.config = c
        self.patch_size = c.patch_size
        self.depth = c.depth
        self.patch_start_idx = c.patch_start_idx
        if c.patch_embed == "dinov2":
            self.patch_embed: nn.Module = DinoV2PatchEmbed(
                img_size=c.img_size,
                patch_size=c.patch_size,
                embed_dim=c.embed_dim,
                depth=c.backbone_depth,
                num_heads=c.backbone_num_heads,
                mlp_ratio=c.mlp_ratio,
                num_register_tokens=c.backbone_registers,
                init_values=c.backbone_init_values,
                interp_antialias=c.backbone_interp_antialias,
            )
        else:
            self.patch_embed = PatchConv(c.patch_size, c.embed_dim)

        def make_block() -> Block:
            return Block(c.embed_dim, c.num_heads, c.mlp_ratio, qk_norm=c.qk_norm, init_values=c.init_values)

        self.frame_blocks = nn.ModuleList([make_block() for _ in range(c.depth)])
        self.global_blocks = nn.ModuleList([make_block() for _ in range(c.depth)])
        self.camera_token = nn.Parameter(torch.zeros(1, 2, 1, c.embed_dim))
        self.register_token = nn.Parameter(torch.zeros(1, 2, c.num_register_tokens, c.embed_dim))
        if not self.camera_token.is_meta:
            nn.init.normal_(self.camera_token, std=1e-6)
            nn.init.normal_(self.register_token, std=1e-6)
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        self.gradient_checkpointing = False

    def _run(self, block: nn.Module, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> Tensor:
        if self.gradient_checkpointing and self.training:
            return checkpoint(block, x, rope, use_reentrant=False)
        return block(x, rope=rope)

    def forward(self, images: Tensor, keep_layers: Iterable[int] | None = None) -> tuple[list[Tensor | None], int]:
        """Aggregate tokens.

        Args:
            images: ``[B, S, 3, H, W]`` in [0, 1]; H and W multiples of ``patch_size``.
            keep_layers: layer indices whose outputs are kept (default: all ``depth``).

        Returns:
            ``(outputs, patch_start_idx)`` where ``outputs[i]`` is ``[B, S, P, 2C]`` for kept
            layers and None otherwise, ``P = patch_start_idx + (H/p)(W/p)``.
        """
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images [B, S, 3, H, W], got {tuple(images.shape)}")
        B, S, _, H, W = images.shape
        p = self.patch_size
        if H % p or W % p:
            raise ValueError(f"image size {H}x{W} must be a multiple of the patch size {p}; resize or crop the input")
        keep = set(range(self.depth)) if keep_layers is None else {i % self.depth for i in keep_layers}

        x = ((images - self._mean) / self._std).reshape(B * S, 3, H, W)
        patches = self.patch_embed(x)  # [B*S, hw, C]
        C = patches.shape[-1]
        tokens = torch.cat(
            [frame_slot_tokens(self.camera_token, B, S), frame_slot_tokens(self.register_token, B, S), patches],
            dim=1,
        ).to(patches.dtype)
        P = tokens.shape[1]

        rope_frame = rope_global = None
        if self.config.rope_freq > 0:
            pos = grid_positions(H // p, W // p, self.patch_start_idx, device=images.device)
            rope_frame = rope_tables(pos, C // self.config.num_heads, self.config.rope_freq, dtype=tokens.dtype)
            rope_global = (rope_frame[0].repeat(S, 1), rope_frame[1].repeat(S, 1))

        outputs: list[Tensor | None] = []
        for i in range(self.depth):
            tokens = self._run(self.frame_blocks[i], tokens.reshape(B * S, P, C), rope_frame)
            frame_out = tokens.reshape(B, S, P, C)
            tokens = self._run(self.global_blocks[i], tokens.reshape(B, S * P, C), rope_global)
            if i in keep:
                outputs.append(torch.cat([frame_out, tokens.reshape(B, S, P, C)], dim=-1))
            else:
                outputs.append(None)
        return outputs, self.patch_start_idx
