"""Two-view relative pose AUC@5/10/20 (ScanNet-1500 protocol of SuperGlue / LoFTR).

Each image pair has a ground-truth relative pose ``[R | t]`` (camera 1 -> camera 2,
``X₂ = R X₁ + t``) and an estimate ``[R̂ | t̂]`` (e.g. from an essential matrix fitted to
matches, or from VGGT's predicted cameras).  The pose error of a pair is

    e = max(e_R, e_t),   e_R = ∠(R̂ᵀ R),   e_t = min(θ, 180° - θ),  θ = ∠(t̂, t),

the translation being known only up to scale and sign (SuperGlue's ``compute_pose_error``).
A failed estimate (NaN / missing) counts as ``e = ∞``.

AUC at threshold ``τ`` is SuperGlue's ``pose_auc``, the area under the recall curve: with
the N errors sorted ``e₁ ≤ … ≤ e_N`` and ``recall_k = k / N``, integrate with the
trapezoidal rule the polyline through ``(0, 0), (e₁, 1/N), …, (e_m, m/N), (τ, m/N)``
(``m`` = number of errors below ``τ``) and divide by ``τ``.  Reported in percent.
This is the "exact AUC" used by LoFTR / LightGlue tables, not a binned mean.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

from metrics.camera import rotation_angle_deg, translation_angle_deg

DEFAULT_THRESHOLDS = (5.0, 10.0, 20.0)


def two_view_pose_errors(pred_poses: Tensor, gt_poses: Tensor) -> Tensor:
    """``max(e_R, e_t)`` in degrees for relative poses ``[N, 3, 4]`` -> ``[N]``; NaN -> inf."""
    if pred_poses.shape != gt_poses.shape or pred_poses.shape[-2:] != (3, 4):
        raise ValueError(
            f"expected matching [N, 3, 4] relative poses, got {tuple(pred_poses.shape)} and {tuple(gt_poses.shape)}"
        )
    e_r = rotation_angle_deg(pred_poses[..., :3], gt_poses[..., :3])
    e_t = translation_angle_deg(pred_poses[..., 3], gt_poses[..., 3], sign_ambiguity=True)
    err = torch.maximum(e_r, e_t)
    return torch.where(torch.isnan(err), torch.full_like(err, math.inf), err).reshape(-1)


def pose_auc(errors: Tensor, thresholds: Sequence[float] = DEFAULT_THRESHOLDS) -> list[Tensor]:
    """Exact recall-curve AUC (percent) at each threshold (see module docstring)."""
    e = errors.double().flatten()
    e = torch.where(torch.isnan(e), torch.full_like(e, math.inf), e)
    n = e.numel()
    if n == 0:
        return [torch.tensor(math.nan, dtype=torch.float64) for _ in thresholds]
    e = torch.sort(e).values
    recall = torch.arange(1, n + 1, dtype=torch.float64, device=e.device) / n
    zero = e.new_zeros(1)
    e, recall = torch.cat([zero, e]), torch.cat([zero, recall])
    aucs = []
    for tau in thresholds:
        last = int(torch.searchsorted(e, torch.tensor(float(tau), dtype=e.dtype, device=e.device)))
        r = torch.cat([recall[:last], recall[last - 1 : last]])
        x = torch.cat([e[:last], torch.tensor([float(tau)], dtype=e.dtype, device=e.device)])
        aucs.append(100.0 * torch.trapezoid(r, x) / tau)
    return aucs


class TwoViewPoseAUC(Metric):
    """Collects per-pair errors; ``compute()`` returns ``{"auc@5", "auc@10", "auc@20"}`` (percent).

    The exact AUC needs every error, so the state is a list concatenated across DDP ranks
    (one float per pair).

    Args:
        thresholds: AUC thresholds in degrees.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(self, thresholds: Sequence[float] = DEFAULT_THRESHOLDS, **kwargs) -> None:
        super().__init__(**kwargs)
        self.thresholds = tuple(float(t) for t in thresholds)
        self.add_state("errors", default=[], dist_reduce_fx="cat")

    def update(self, pred_poses: Tensor, gt_poses: Tensor) -> None:
        """Add pairs: relative poses ``[N, 3, 4]`` (camera 1 -> camera 2)."""
        self.errors.append(two_view_pose_errors(pred_poses, gt_poses))

    def compute(self) -> dict[str, Tensor]:
        errors = dim_zero_cat(self.errors) if len(self.errors) else torch.zeros(0, dtype=torch.float64)
        return {f"auc@{t:g}": a for t, a in zip(self.thresholds, pose_auc(errors, self.thresholds))}
