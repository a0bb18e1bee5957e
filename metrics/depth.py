"""Depth accuracy: AbsRel and δ < 1.25 with per-image median scale alignment.

For each image with valid pixels ``V = {p : mask_p, d_p > 0, d_p and d̂_p finite}``
(``d`` ground truth, ``d̂`` prediction), the prediction is rescaled by

    s = median_{p∈V}(d_p) / median_{p∈V}(d̂_p)        (``align="median"``; ``s = 1`` for ``"none"``)

and, with ``d̃ = s d̂``,

    AbsRel = (1/|V|) Σ_V |d̃_p - d_p| / d_p,
    δ₁     = (1/|V|) Σ_V [ max(d̃_p / d_p, d_p / d̃_p) < 1.25 ]      (d̃_p ≤ 0 counts as a miss).

Both are averaged over images (each image weighs the same), images without valid pixels
are skipped.  δ is reported as a fraction in [0, 1].  Median alignment makes the metric
invariant to a global scale of each predicted depth map.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def depth_errors(
    pred: Tensor, target: Tensor, mask: Tensor | None = None, align: str = "median", threshold: float = 1.25
) -> tuple[Tensor, Tensor, Tensor]:
    """Per-image AbsRel and δ.

    Args:
        pred, target: ``[..., H, W]`` z-depth (a trailing singleton channel ``[..., H, W, 1]``
            in ``pred`` is squeezed, matching VGGT's depth head).
        mask: ``[..., H, W]`` bool or ``None``.
        align: ``"median"`` or ``"none"``.

    Returns:
        ``abs_rel [N]``, ``delta [N]``, ``has_valid [N]`` bool over the flattened leading dims.
    """
    if pred.dim() == target.dim() + 1 and pred.shape[-1] == 1:
        pred = pred[..., 0]
    if pred.shape != target.shape:
        raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} depth shapes differ")
    if align not in ("median", "none"):
        raise ValueError(f"align must be 'median' or 'none', got {align!r}")
    h, w = target.shape[-2:]
    pred, target = pred.reshape(-1, h * w).double(), target.reshape(-1, h * w).double()
    valid = torch.isfinite(pred) & torch.isfinite(target) & (target > 0)
    if mask is not None:
        valid &= mask.reshape(-1, h * w).bool()
    abs_rel, delta = [], []
    for p, t, v in zip(pred, target, valid):
        if not v.any():
            abs_rel.append(torch.tensor(math.nan, dtype=torch.float64, device=p.device))
            delta.append(torch.tensor(math.nan, dtype=torch.float64, device=p.device))
            continue
        p, t = p[v], t[v]
        if align == "median":
            pm = p.median()
            p = p * (t.median() / pm) if pm != 0 else p
        abs_rel.append(((p - t).abs() / t).mean())
        ratio = torch.where(p > 0, torch.maximum(p / t, t / p.clamp_min(1e-300)), torch.full_like(p, math.inf))
        delta.append((ratio < threshold).double().mean())
    return torch.stack(abs_rel), torch.stack(delta), valid.any(dim=-1)


class DepthMetric(Metric):
    """Mean over images of AbsRel and δ<1.25 (see module docstring).

    ``compute()`` returns ``{"abs_rel", "delta_1.25"}``; states are sums (DDP exact).

    Args:
        align: ``"median"`` (per-image median scale) or ``"none"``.
        threshold: δ threshold (1.25).
    """

    full_state_update = False
    higher_is_better = None

    def __init__(self, align: str = "median", threshold: float = 1.25, **kwargs) -> None:
        super().__init__(**kwargs)
        if align not in ("median", "none"):
            raise ValueError(f"align must be 'median' or 'none', got {align!r}")
        self.align, self.threshold = align, threshold
        self.add_state("abs_rel_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("delta_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_images", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred: Tensor, target: Tensor, mask: Tensor | None = None) -> None:
        """Add images: ``pred``/``target`` ``[..., H, W]``, ``mask`` ``[..., H, W]``."""
        abs_rel, delta, ok = depth_errors(pred, target, mask, self.align, self.threshold)
        self.abs_rel_sum += abs_rel[ok].sum()
        self.delta_sum += delta[ok].sum()
        self.num_images += ok.sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.num_images.double()
        nan = torch.tensor(math.nan, dtype=torch.float64)
        if self.num_images == 0:
            return {"abs_rel": nan, f"delta_{self.threshold:g}": nan}
        return {"abs_rel": self.abs_rel_sum / n, f"delta_{self.threshold:g}": self.delta_sum / n}
