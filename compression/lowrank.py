"""A small, explicit low-rank replacement for ``nn.Linear``.

A dense layer ``y = W x + b`` with ``W`` of shape ``(out, in)`` becomes

    y = up(down(x)) = U (V x) + b,   down.weight = V  (r x in),  up.weight = U  (out x r)

so the layer stores ``r (in + out)`` weights instead of ``in * out`` and costs
``2 r (in + out)`` FLOPs per token instead of ``2 in out``.  It saves anything only when
``r < in * out / (in + out)``.

The two factors are ordinary ``nn.Linear`` modules named ``down`` and ``up`` so that
LoRA tooling (peft) can target either side by name and state dicts read
``<name>.down.weight``, ``<name>.up.weight``, ``<name>.up.bias``.  How the factors are
*chosen* (SVD, whitening, ...) lives in :mod:`compression.methods`, not here.
"""

from __future__ import annotations

import functools

import torch
from torch import nn


class LowRankLinear(nn.Module):
    """``x -> up(down(x))``: ``down`` is ``(rank x in)``, ``up`` is ``(out x rank)`` with the bias.

    Shapes: input ``[..., in_features]`` -> output ``[..., out_features]``.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        rank: int,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if not 1 <= rank:
            raise ValueError(f"LowRankLinear rank must be >= 1, got {rank}")
        self.in_features = in_features
        self.out_features = out_features
        self.rank = rank
        self.down = nn.Linear(in_features, rank, bias=False, device=device, dtype=dtype)
        self.up = nn.Linear(rank, out_features, bias=bias, device=device, dtype=dtype)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        rank: int,
        up: torch.Tensor | None = None,
        down: torch.Tensor | None = None,
    ) -> LowRankLinear:
        """A low-rank layer with ``linear``'s shapes, dtype, device and bias.

        With ``up (out x rank)`` and ``down (rank x in)`` given, they become the factors;
        without them the factors are freshly initialised (the structure only, e.g. to
        load a compressed state dict into).  The bias is always copied from ``linear``.
        """
        if (up is None) != (down is None):
            raise ValueError("from_linear needs both `up` and `down`, or neither")
        weight = linear.weight
        # with factors given, no random initialisation they would overwrite at once (two uniform fills per layer)
        build = cls if up is None else functools.partial(nn.utils.skip_init, cls)
        layer = build(
            linear.in_features,
            linear.out_features,
            rank,
            bias=linear.bias is not None,
            device=weight.device,
            dtype=weight.dtype,
        )
        if up is not None and down is not None:
            layer.set_factors(up, down)
        if linear.bias is not None:
            with torch.no_grad():
                layer.up.bias.copy_(linear.bias)
        return layer

    @torch.no_grad()
    def set_factors(self, up: torch.Tensor, down: torch.Tensor) -> None:
        """Copy ``up (out x rank)`` and ``down (rank x in)`` into the factors (cast to their dtype)."""
        if tuple(up.shape) != tuple(self.up.weight.shape) or tuple(down.shape) != tuple(self.down.weight.shape):
            raise ValueError(
                f"factor shapes up {tuple(up.shape)} / down {tuple(down.shape)} do not match the layer's "
                f"up {tuple(self.up.weight.shape)} / down {tuple(self.down.weight.shape)}"
            )
        self.up.weight.copy_(up)
        self.down.weight.copy_(down)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.down(x))

    def to_linear(self) -> nn.Linear:
        """Merge back into a dense ``nn.Linear`` with ``W = up.weight @ down.weight``."""
        return merged_linear(self.up, self.down.weight)

    def num_parameters(self) -> int:
        """Stored parameters: ``rank * (in + out)`` plus the bias."""
        bias = self.out_features if self.up.bias is not None else 0
        return self.rank * (self.in_features + self.out_features) + bias

    def flops_per_token(self) -> int:
        """Multiply-adds counted as 2 FLOPs: ``2 * rank * (in + out)`` (bias ignored)."""
        return 2 * self.rank * (self.in_features + self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}, "
            f"bias={self.up.bias is not None}"
        )


@torch.no_grad()
def merged_linear(up: nn.Linear, down_weight: torch.Tensor) -> nn.Linear:
    """A dense ``nn.Linear`` with ``W = up.weight @ down_weight`` (multiplied in float64) and ``up``'s bias, built
    without the random initialisation it would overwrite at once."""
    w = up.weight
    linear = nn.utils.skip_init(nn.Linear, down_weight.shape[1], w.shape[0], bias=up.bias is not None,
                                device=w.device, dtype=w.dtype)
    linear.weight.copy_((w.double() @ down_weight.double()).to(w.dtype))
    if up.bias is not None:
        linear.bias.copy_(up.bias)
    return linear


def dense_flops_per_token(linear: nn.Linear) -> int:
    """FLOPs per token of a dense layer, counted like :meth:`LowRankLinear.flops_per_token`."""
    return 2 * linear.in_features * linear.out_features


def linear_num_parameters(linear: nn.Linear) -> int:
    return linear.weight.numel() + (linear.bias.numel() if linear.bias is not None else 0)


def rank_for_ratio(out_features: int, in_features: int, ratio: float) -> int:
    """Rank that removes (about) ``ratio`` of an ``out x in`` weight: ``floor((1-ratio) m n / (m+n))``.

    Never below 1.  The real parameter count after compression must still be measured,
    not assumed from this formula (the floor removes a little more than asked).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"ratio (fraction of parameters removed) must lie in [0, 1), got {ratio}")
    m, n = out_features, in_features
    return max(1, int((1.0 - ratio) * m * n // (m + n)))
