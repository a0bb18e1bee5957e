"""Transformer building blocks of VGGT: LayerScale, Mlp, 2-D RoPE, attention, pre-norm block.

Block (pre-norm, LayerScale ``γ`` per channel)::

    x <- x + γ1 ⊙ Attn(LN1(x))
    x <- x + γ2 ⊙ Mlp(LN2(x)),           Mlp(x) = W2 GELU(W1 x + b1) + b2   (exact GELU)

Attention with optional qk-norm and 2-D RoPE (``h`` heads of width ``d = C / h``)::

    [q, k, v] = split(W_qkv x + b),   q <- LN_q(q),  k <- LN_k(k)   (per head, over d)
    q <- R(p) q,  k <- R(p) k,        out = W_o softmax(q kᵀ / √d) v + b_o

2-D rotary embedding ``R(p)`` for a token at grid position ``p = (y, x)``: the first
``d/2`` channels are rotated by ``y``, the last ``d/2`` by ``x``.  Inside each half
(width ``m = d/2``) the "rotate-half" form pairs channel ``i`` with ``i + m/2``::

    θ_j = base^(-2j/m),  j = 0..m/2-1            (base = 100)
    [a_i, a_{i+m/2}] <- [a_i cos(pθ_i) - a_{i+m/2} sin(pθ_i), a_{i+m/2} cos(pθ_i) + a_i sin(pθ_i)]

so ``⟨R(p)q, R(p')k⟩`` depends only on ``p - p'`` and ``R(0) = I``.  Positions are the
patch grid coordinates plus one; the camera and register tokens sit at ``(0, 0)``.
All projections are plain ``nn.Linear`` so the compression toolkit can swap them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

RopeTables = tuple[Tensor, Tensor]


class LayerScale(nn.Module):
    """Per-channel scale ``x * gamma`` with ``gamma`` of shape ``[C]``."""

    def __init__(self, dim: int, init_values: float = 1e-5) -> None:
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.gamma


class Mlp(nn.Module):
    """Two-layer perceptron ``fc2(GELU(fc1(x)))``: ``[..., C_in] -> [..., C_out]``."""

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None) -> None:
        super().__init__()
        hidden_features = hidden_features or in_features
        out_features = out_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


# ----------------------------------------------------------------------------- 2-D RoPE


def grid_positions(height: int, width: int, num_special: int, device: torch.device | str | None = None) -> Tensor:
    """Integer positions ``[num_special + height*width, 2]`` as ``(y, x)``.

    Special tokens (camera, registers) get ``(0, 0)``; patch ``(i, j)`` in row-major
    order gets ``(i + 1, j + 1)``.
    """
    ys = torch.arange(height, device=device) + 1
    xs = torch.arange(width, device=device) + 1
    grid = torch.stack(torch.meshgrid(ys, xs, indexing="ij"), dim=-1).reshape(height * width, 2)
    special = torch.zeros(num_special, 2, dtype=grid.dtype, device=device)
    return torch.cat([special, grid], dim=0)


def rope_tables(
    positions: Tensor, head_dim: int, base: float = 100.0, dtype: torch.dtype = torch.float32
) -> RopeTables:
    """cos / sin tables ``[N, head_dim]`` for 2-D positions ``[N, 2]`` (see module docstring).

    Layout along the last axis: ``[cos(yθ), cos(yθ), cos(xθ), cos(xθ)]`` with ``θ`` of
    length ``head_dim / 4``; computed directly from the positions (no data-dependent
    table size), so it also runs on the meta device.
    """
    if head_dim % 4 != 0:
        raise ValueError(f"2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    half = head_dim // 2
    inv_freq = 1.0 / (base ** (torch.arange(0, half, 2, device=positions.device).float() / half))
    pos = positions.float()
    ang_y = (pos[:, 0:1] * inv_freq).to(dtype)
    ang_x = (pos[:, 1:2] * inv_freq).to(dtype)
    angles = torch.cat([ang_y, ang_y, ang_x, ang_x], dim=-1)
    return angles.cos(), angles.sin()


def _rotate_halves(x: Tensor) -> Tensor:
    """Within each half of the last axis, map ``[a, b] -> [-b, a]`` (quarters a, b)."""
    q1, q2, q3, q4 = x.chunk(4, dim=-1)
    return torch.cat([-q2, q1, -q4, q3], dim=-1)


def apply_rope(x: Tensor, tables: RopeTables) -> Tensor:
    """Rotate ``x`` ``[..., N, d]`` by tables ``([N, d], [N, d])``: ``x cos + rot(x) sin``."""
    cos, sin = tables
    return x * cos.to(x.dtype) + _rotate_halves(x) * sin.to(x.dtype)


# ----------------------------------------------------------------------------- attention


class Attention(nn.Module):
    """Multi-head self-attention ``[B, N, C] -> [B, N, C]`` with optional qk-norm and RoPE."""

    def __init__(
        self, dim: int, num_heads: int, qkv_bias: bool = True, proj_bias: bool = True, qk_norm: bool = False
    ) -> None:
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} must be divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.q_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = nn.LayerNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim, bias=proj_bias)

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        """``x [B, N, C]``; ``rope`` tables of shape ``[N, head_dim]`` or None."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each [B, h, N, d]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, rope), apply_rope(k, rope)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(B, N, C))


class Block(nn.Module):
    """Pre-norm transformer block ``[B, N, C] -> [B, N, C]`` (see module docstring).

    ``init_values=None`` disables LayerScale; ``norm_eps`` is 1e-5 for the aggregator
    and camera trunk, 1e-6 inside DINOv2.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = False,
        init_values: float | None = None,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        self.attn = Attention(dim, num_heads, qk_norm=qk_norm)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: Tensor, rope: RopeTables | None = None) -> Tensor:
        x = x + self.ls1(self.attn(self.norm1(x), rope=rope))
        return x + self.ls2(self.mlp(self.norm2(x)))
