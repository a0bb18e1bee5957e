"""Building blocks of the CoTracker-style tracker used by the VGGT track head.

* ``bilinear_sample``: ``grid_sample`` with pixel coordinates (``x ∈ [0, W-1]``,
  align_corners), ``sample_points``: features ``[B, C, H, W]`` at points ``[B, N, 2] -> [B, N, C]``.
* ``CorrPyramid``: feature maps ``[B, S, C, H, W]`` average-pooled ``L`` times by 2; for
  track features ``f [B, S, N, C]`` and points ``p``, level ``l`` gives the correlation
  ``⟨f, F_l(u)⟩ / √C`` sampled on a ``(2r+1)²`` window around ``p / 2^l``
  (zero padding) -> ``[B, S, N, L(2r+1)²]``.
* ``UpdateFormer``: tokens ``[B, N, T, D_in]`` -> LN -> Linear -> alternating time attention
  (over T per track) and space attention through ``V`` learned virtual tracks (cross-attn
  points→virtual, self-attn, virtual→points), plus the input, -> LN -> Linear.
* ``AttnBlock`` / ``CrossAttnBlock``: ``x = LN(x); x = x + MHA(x, c, c); x = x + Mlp(LN(x))``
  (the residual starts from the normed input, as in the original).

The attention layers are ``nn.MultiheadAttention`` (as in the original checkpoint); the
compression toolkit must not factorize them in place.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.vggt.layers import Mlp


def bilinear_sample(inputs: Tensor, coords: Tensor, padding_mode: str = "border") -> Tensor:
    """Sample ``inputs [B, C, H, W]`` at pixel coords ``[B, h, w, 2]`` (x, y) -> ``[B, C, h, w]``."""
    H, W = inputs.shape[-2:]
    scale = torch.tensor([2 / max(W - 1, 1), 2 / max(H - 1, 1)], device=coords.device, dtype=inputs.dtype)
    grid = coords.detach().to(inputs.dtype) * scale - 1
    return F.grid_sample(inputs, grid, align_corners=True, padding_mode=padding_mode)


def sample_points(features: Tensor, points: Tensor) -> Tensor:
    """Bilinear features ``[B, N, C]`` of ``features [B, C, H, W]`` at ``points [B, N, 2]`` (border padding)."""
    out = bilinear_sample(features, points.unsqueeze(2))  # [B, C, N, 1]
    return out.squeeze(-1).permute(0, 2, 1)


def sincos_grid_embedding(dim: int, height: int, width: int, device=None) -> Tensor:
    """Fixed 2-D sin/cos embedding ``[1, dim, height, width]`` (base 10000).

    The first half encodes the x (column) coordinate, the second half y; each half is
    ``[sin(pos ω), cos(pos ω)]`` with ``ω_j = 10000^(-j / (dim/4))``.
    """
    omega = torch.arange(dim // 4, dtype=torch.float64, device=device) / (dim / 4.0)
    omega = 1.0 / 10000**omega
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float64, device=device),
        torch.arange(width, dtype=torch.float64, device=device),
        indexing="ij",
    )
    parts = []
    for pos in (xs.reshape(-1, 1), ys.reshape(-1, 1)):
        parts += [(pos * omega).sin(), (pos * omega).cos()]
    emb = torch.cat(parts, dim=1).float()
    return emb.reshape(1, height, width, dim).permute(0, 3, 1, 2)


def flow_embedding(xy: Tensor, dim: int) -> Tensor:
    """``[B, N, 2] -> [B, N, 2·dim]``: interleaved ``sin/cos(v · 1000·2j/dim)`` for x then y."""
    freqs = torch.arange(0, dim, 2, device=xy.device, dtype=xy.dtype) * (1000.0 / dim)
    out = []
    for v in (xy[..., 0:1], xy[..., 1:2]):
        ang = v * freqs
        out.append(torch.stack([ang.sin(), ang.cos()], dim=-1).flatten(-2))
    return torch.cat(out, dim=-1)


class AttnBlock(nn.Module):
    """Self-attention block on ``[B, N, C]`` with ``nn.MultiheadAttention``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor) -> Tensor:
        x = self.norm1(x)
        x = x + self.attn(x, x, x)[0]  # need_weights=True as in the original: its slow path is the reference numerics
        return x + self.mlp(self.norm2(x))


class CrossAttnBlock(nn.Module):
    """Cross-attention block: queries ``x [B, N, C]`` attend to ``context [B, M, C]``."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm_context = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)
        self.cross_attn = nn.MultiheadAttention(hidden_size, num_heads, batch_first=True)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))

    def forward(self, x: Tensor, context: Tensor) -> Tensor:
        x = self.norm1(x)
        context = self.norm_context(context)
        x = x + self.cross_attn(x, context, context)[0]
        return x + self.mlp(self.norm2(x))


class UpdateFormer(nn.Module):
    """Transformer mapping ``[B, N, T, input_dim]`` to updates ``[B, N, T, output_dim]``."""

    def __init__(
        self,
        depth: int = 6,
        input_dim: int = 388,
        hidden_size: int = 384,
        num_heads: int = 8,
        output_dim: int = 130,
        mlp_ratio: float = 4.0,
        num_virtual_tracks: int = 64,
    ) -> None:
        super().__init__()
        self.num_virtual_tracks = num_virtual_tracks
        self.input_norm = nn.LayerNorm(input_dim)
        self.input_transform = nn.Linear(input_dim, hidden_size)
        self.output_norm = nn.LayerNorm(hidden_size)
        self.flow_head = nn.Linear(hidden_size, output_dim)
        # "virual" (sic) is the official parameter name.
        self.virual_tracks = nn.Parameter(torch.zeros(1, num_virtual_tracks, 1, hidden_size))
        self.time_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.space_virtual_blocks = nn.ModuleList([AttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.space_point2virtual_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        self.space_virtual2point_blocks = nn.ModuleList(
            [CrossAttnBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)]
        )
        if not self.virual_tracks.is_meta:
            nn.init.normal_(self.virual_tracks)
            for m in self.modules():
                if isinstance(m, nn.Linear):
                    nn.init.xavier_uniform_(m.weight)
                    nn.init.zeros_(m.bias)
            nn.init.trunc_normal_(self.flow_head.weight, std=0.001)

    def forward(self, x: Tensor) -> Tensor:
        tokens = self.input_transform(self.input_norm(x))
        init_tokens = tokens
        B, N, T, C = tokens.shape
        tokens = torch.cat([tokens, self.virual_tracks.expand(B, -1, T, -1)], dim=1)
        M = tokens.shape[1]
        for time_block, v2p, virtual_block, p2v in zip(
            self.time_blocks,
            self.space_virtual2point_blocks,
            self.space_virtual_blocks,
            self.space_point2virtual_blocks,
        ):
            tokens = time_block(tokens.reshape(B * M, T, C)).reshape(B, M, T, C)
            space = tokens.permute(0, 2, 1, 3).reshape(B * T, M, C)
            points, virtual = space[:, :N], space[:, N:]
            virtual = virtual_block(v2p(virtual, points))
            points = p2v(points, virtual)
            tokens = torch.cat([points, virtual], dim=1).reshape(B, T, M, C).permute(0, 2, 1, 3)
        tokens = tokens[:, :N] + init_tokens
        return self.flow_head(self.output_norm(tokens))


class CorrPyramid:
    """Multi-scale correlation sampler over feature maps ``[B, S, C, H, W]`` (see module docstring)."""

    def __init__(self, fmaps: Tensor, num_levels: int, radius: int) -> None:
        self.radius = radius
        self.levels = [fmaps]
        for _ in range(num_levels - 1):
            B, S, C, H, W = self.levels[-1].shape
            pooled = F.avg_pool2d(self.levels[-1].reshape(B * S, C, H, W), kernel_size=2, stride=2)
            self.levels.append(pooled.reshape(B, S, C, *pooled.shape[-2:]))
        lin = torch.linspace(-radius, radius, 2 * radius + 1, device=fmaps.device, dtype=fmaps.dtype)
        # offset (i, j) of the window = (lin[i], lin[j]) added to (x, y), matching the checkpoint's order
        self.delta = torch.stack(torch.meshgrid(lin, lin, indexing="ij"), dim=-1)

    def sample(self, targets: Tensor, coords: Tensor) -> Tensor:
        """``targets [B, S, N, C]``, ``coords [B, S, N, 2]`` -> ``[B, S, N, L(2r+1)²]``."""
        B, S, N, C = targets.shape
        k = 2 * self.radius + 1
        out = []
        for lvl, fmaps in enumerate(self.levels):
            H, W = fmaps.shape[-2:]
            corr = torch.matmul(targets, fmaps.reshape(B, S, C, H * W)) / math.sqrt(C)  # [B, S, N, HW]
            centre = coords.reshape(B * S * N, 1, 1, 2) / (2**lvl)
            window = centre + self.delta.to(coords.dtype).view(1, k, k, 2)
            sampled = bilinear_sample(corr.reshape(B * S * N, 1, H, W), window, padding_mode="zeros")
            out.append(sampled.reshape(B, S, N, -1))
        return torch.cat(out, dim=-1)
