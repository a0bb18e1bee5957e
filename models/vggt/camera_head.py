"""Camera head: iterative pose refinement of the camera tokens with AdaLN modulation.

From the last aggregator layer take the camera token of each frame, ``z = LN(t[:, :, 0])``
(``[B, S, D]``, ``D = 2C``).  Starting from a learned ``g_0`` (the "empty pose"), each of
the ``K = 4`` iterations does::

    e = W_e g + b_e                                   (g: previous 9-D encoding, detached)
    [β, γ, α] = split(W_m SiLU(e) + b_m)              (shift, scale, gate; each [B, S, D])
    u = z + α ⊙ (LN₀(z) (1 + γ) + β)                  (LN₀: no affine, eps 1e-6)
    g = g + Mlp(LN(Trunk(u)))                         (first iteration: g = Mlp(...))
    emit act(g) = [T, q, relu(fov)]

``Trunk`` is ``camera_trunk_depth`` pre-norm blocks attending across the S frames of each
batch element (no RoPE, no qk-norm).  The 9-D encoding is "absT_quaR_FoV": translation
(3), quaternion XYZW (4), field of view (h, w) in radians (2); see ``pose.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.vggt.layers import Block, Mlp

POSE_DIM = 9


def activate_pose(enc: Tensor) -> Tensor:
    """Head activation of a raw ``[..., 9]`` encoding: identity on T and q, ReLU on the FoV."""
    return torch.cat([enc[..., :7], F.relu(enc[..., 7:])], dim=-1)


class CameraHead(nn.Module):
    """Predict ``[B, S, 9]`` pose encodings from aggregated tokens (see module docstring).

    Args:
        dim_in: token width ``D`` (twice the aggregator width).
        trunk_depth / num_heads / mlp_ratio / init_values: trunk block sizes.
        iters: default number of refinement iterations.
    """

    def __init__(
        self,
        dim_in: int = 2048,
        trunk_depth: int = 4,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        init_values: float = 0.01,
        iters: int = 4,
    ) -> None:
        super().__init__()
        self.iters = iters
        self.trunk = nn.ModuleList(
            [Block(dim_in, num_heads, mlp_ratio, init_values=init_values) for _ in range(trunk_depth)]
        )
        self.token_norm = nn.LayerNorm(dim_in)
        self.trunk_norm = nn.LayerNorm(dim_in)
        self.empty_pose_tokens = nn.Parameter(torch.zeros(1, 1, POSE_DIM))
        self.embed_pose = nn.Linear(POSE_DIM, dim_in)
        self.poseLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(dim_in, 3 * dim_in))
        self.adaln_norm = nn.LayerNorm(dim_in, elementwise_affine=False, eps=1e-6)
        self.pose_branch = Mlp(dim_in, dim_in // 2, POSE_DIM)

    def forward(self, aggregated_tokens: list[Tensor | None], iters: int | None = None) -> list[Tensor]:
        """``aggregated_tokens[-1]`` is ``[B, S, P, D]``; returns ``iters`` encodings ``[B, S, 9]``."""
        last = aggregated_tokens[-1]
        if last is None:
            raise ValueError("the camera head needs the last aggregator layer; keep it in keep_layers")
        z = self.token_norm(last[:, :, 0].to(self.token_norm.weight.dtype))
        B, S, _ = z.shape
        enc: Tensor | None = None
        outputs = []
        for _ in range(self.iters if iters is None else iters):
            g = self.empty_pose_tokens.expand(B, S, -1) if enc is None else enc.detach()
            shift, scale, gate = self.poseLN_modulation(self.embed_pose(g)).chunk(3, dim=-1)
            u = z + gate * (self.adaln_norm(z) * (1 + scale) + shift)
            for block in self.trunk:
                u = block(u)
            delta = self.pose_branch(self.trunk_norm(u))
            enc = delta if enc is None else enc + delta
            outputs.append(activate_pose(enc))
        return outputs
