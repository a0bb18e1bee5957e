"""Multi-view camera pose accuracy: RRA / RTA / AUC over all frame pairs (VGGT / PoseDiffusion).

For one sample of S cameras with extrinsics ``E_i = [R_i | t_i]`` (OpenCV, camera-from-world)
and every unordered pair ``i < j`` (S(S-1)/2 pairs), the relative pose taking camera ``i``
coordinates to camera ``j`` coordinates is

    E_ij = E_j E_i⁻¹:   R_ij = R_j R_iᵀ,   t_ij = t_j - R_ij t_i.

It does not depend on the world frame (nor, for directions, on the world scale), so
predictions expressed in the first camera's frame compare directly with ground truth in
any world frame.  (Some evaluation scripts compose ``inv(E_i) · E_j`` of world-to-camera
matrices instead; that is not frame invariant, so we use the geometric relative pose.)

Errors per pair, in degrees:

* rotation: ``e_R = ∠(R̂_ijᵀ R_ij) = atan2(‖vee(M - Mᵀ)‖ / 2, (tr M - 1) / 2)``, exact near 0;
* translation direction: ``θ = ∠(t̂_ij, t_ij)`` and, as in PoseDiffusion's
  ``compare_translation_by_angle`` used by VGGT's CO3D evaluation, the sign ambiguity is
  folded: ``e_t = min(θ, 180° - θ) ∈ [0°, 90°]`` (their ``arccos(sqrt(1 - clamp(1 - cos²)))``
  equals ``arccos|cos θ|``).  ``sign_ambiguity=False`` keeps ``θ ∈ [0°, 180°]``.  If both
  translations are ~0 the error is 0 (PoseDiffusion's
  normalisation gives 90° there); if exactly one is, the direction is undefined: 90°.

Summaries (percentages): ``RRA@τ = 100 · mean[e_R < τ]``, ``RTA@τ = 100 · mean[e_t < τ]`` and

    AUC@T = 100 · (1/T) Σ_{k=1..T} mean[ max(e_R, e_t) < k ],

i.e. VGGT's ``calculate_auc_np``: a histogram of ``max(e_R, e_t)`` with 1° bins on
``[0, T]`` (``np.histogram``: the last bin is closed, so an error of exactly T counts in
it), cumulative-summed and averaged over the T bins.  Errors that are NaN count as failures.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric


def rotation_angle_deg(rot_a: Tensor, rot_b: Tensor) -> Tensor:
    """Geodesic angle in degrees between rotations ``[..., 3, 3]``: ``∠(R_aᵀ R_b)``."""
    m = rot_a.double().transpose(-1, -2) @ rot_b.double()
    skew = torch.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0], m[..., 1, 0] - m[..., 0, 1]], -1)
    trace = m[..., 0, 0] + m[..., 1, 1] + m[..., 2, 2]
    return torch.rad2deg(torch.atan2(skew.norm(dim=-1) / 2, (trace - 1) / 2))


def translation_angle_deg(t_pred: Tensor, t_gt: Tensor, sign_ambiguity: bool = True, eps: float = 1e-12) -> Tensor:
    """Angle in degrees between translation directions ``[..., 3]`` (see module docstring)."""
    a, b = t_pred.double(), t_gt.double()
    angle = torch.rad2deg(torch.atan2(torch.linalg.cross(a, b).norm(dim=-1), (a * b).sum(-1)))
    if sign_ambiguity:
        angle = torch.minimum(angle, 180.0 - angle)
    small_a, small_b = a.norm(dim=-1) < eps, b.norm(dim=-1) < eps
    angle = torch.where(small_a ^ small_b, torch.full_like(angle, 90.0), angle)
    return torch.where(small_a & small_b, torch.zeros_like(angle), angle)


def pair_indices(num_views: int, device=None) -> tuple[Tensor, Tensor]:
    """Indices ``(i, j)`` of all unordered pairs ``i < j`` (each ``[S(S-1)/2]``)."""
    idx = torch.triu_indices(num_views, num_views, offset=1, device=device)
    return idx[0], idx[1]


def relative_pose_errors(
    pred_extrinsics: Tensor, gt_extrinsics: Tensor, sign_ambiguity: bool = True
) -> tuple[Tensor, Tensor]:
    """Rotation and translation-angle errors (degrees) of all pairs ``i < j``.

    Args:
        pred_extrinsics, gt_extrinsics: ``[S, 3, 4]`` or ``[B, S, 3, 4]`` camera-from-world.

    Returns:
        ``(e_R, e_t)`` each ``[P]`` or ``[B, P]`` with ``P = S(S-1)/2``.
    """
    if pred_extrinsics.shape != gt_extrinsics.shape or pred_extrinsics.shape[-2:] != (3, 4):
        raise ValueError(
            f"expected matching [..., S, 3, 4] extrinsics, got {tuple(pred_extrinsics.shape)} "
            f"and {tuple(gt_extrinsics.shape)}"
        )
    num_views = pred_extrinsics.shape[-3]
    if num_views < 2:
        raise ValueError("relative pose errors need at least 2 views per sample")
    i, j = pair_indices(num_views, pred_extrinsics.device)

    def relative(e: Tensor) -> tuple[Tensor, Tensor]:
        e = e.double()
        r_i, r_j = e[..., i, :, :3], e[..., j, :, :3]
        r_ij = r_j @ r_i.transpose(-1, -2)
        t_ij = e[..., j, :, 3] - (r_ij @ e[..., i, :, 3:]).squeeze(-1)
        return r_ij, t_ij

    r_pred, t_pred = relative(pred_extrinsics)
    r_gt, t_gt = relative(gt_extrinsics)
    return rotation_angle_deg(r_pred, r_gt), translation_angle_deg(t_pred, t_gt, sign_ambiguity)


def error_histogram(errors: Tensor, max_threshold: int) -> Tensor:
    """Counts of ``errors`` in 1° bins ``[k-1, k)`` for k = 1..T (last bin closed): ``[T]`` long."""
    e = errors.double().flatten()
    ok = (e >= 0) & (e <= max_threshold)  # False for NaN
    idx = torch.floor(e[ok]).long().clamp_max(max_threshold - 1)
    return torch.bincount(idx, minlength=max_threshold)


def auc_from_histogram(histogram: Tensor, num_pairs: int | Tensor) -> Tensor:
    """``100 · mean_k cumsum(histogram)[k] / num_pairs`` (VGGT's ``calculate_auc_np``)."""
    return 100.0 * (histogram.double().cumsum(0) / num_pairs).mean()


def pose_auc_from_errors(rot_errors: Tensor, trans_errors: Tensor, max_threshold: int = 30) -> Tensor:
    """AUC@T in percent of ``max(e_R, e_t)`` over all given pairs (1° bins)."""
    max_err = torch.maximum(rot_errors.double(), trans_errors.double()).flatten()
    return auc_from_histogram(error_histogram(max_err, max_threshold), max_err.numel())


def camera_pose_auc(pred_extrinsics: Tensor, gt_extrinsics: Tensor, max_threshold: int = 30) -> Tensor:
    """AUC@``max_threshold`` (percent) of all frame pairs; extrinsics ``[S,3,4]`` or ``[B,S,3,4]``."""
    rot, trans = relative_pose_errors(pred_extrinsics, gt_extrinsics)
    return pose_auc_from_errors(rot, trans, max_threshold)


class CameraPoseMetric(Metric):
    """Accumulates pairwise pose errors; ``compute()`` returns percentages and mean errors.

    Keys: ``auc@T``, ``rra@τ``, ``rta@τ`` (percent), ``rot_error_mean``, ``trans_error_mean``
    (degrees, NaN-free pairs only).  All states are sums, so DDP reduction is exact.

    Args:
        max_threshold: T of AUC@T (integer degrees, 1° bins).
        accuracy_threshold: τ of RRA@τ / RTA@τ in degrees.
        sign_ambiguity: fold translation angles to ``min(θ, 180° - θ)``.
    """

    full_state_update = False
    higher_is_better = True

    def __init__(
        self, max_threshold: int = 30, accuracy_threshold: float = 30.0, sign_ambiguity: bool = True, **kwargs
    ) -> None:
        super().__init__(**kwargs)
        if int(max_threshold) != max_threshold or max_threshold < 1:
            raise ValueError(f"max_threshold must be a positive integer of degrees, got {max_threshold}")
        self.max_threshold = int(max_threshold)
        self.accuracy_threshold = float(accuracy_threshold)
        self.sign_ambiguity = sign_ambiguity
        self.add_state("histogram", default=torch.zeros(self.max_threshold, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("num_pairs", "rot_accurate", "trans_accurate", "num_finite"):
            self.add_state(name, default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        for name in ("rot_error_sum", "trans_error_sum"):
            self.add_state(name, default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")

    def update(self, pred_extrinsics: Tensor, gt_extrinsics: Tensor) -> None:
        """Add the pairs of ``[B, S, 3, 4]`` (or ``[S, 3, 4]``) predictions and targets."""
        rot, trans = relative_pose_errors(pred_extrinsics, gt_extrinsics, self.sign_ambiguity)
        rot, trans = rot.flatten(), trans.flatten()
        self.histogram += error_histogram(torch.maximum(rot, trans), self.max_threshold).to(self.histogram.device)
        self.num_pairs += rot.numel()
        self.rot_accurate += (rot < self.accuracy_threshold).sum()
        self.trans_accurate += (trans < self.accuracy_threshold).sum()
        finite = torch.isfinite(rot) & torch.isfinite(trans)
        self.num_finite += finite.sum()
        self.rot_error_sum += rot[finite].sum()
        self.trans_error_sum += trans[finite].sum()

    def compute(self) -> dict[str, Tensor]:
        n = self.num_pairs.clamp_min(1).double()
        nf = self.num_finite.clamp_min(1).double()
        tau = f"{self.accuracy_threshold:g}"
        nan = torch.tensor(math.nan, dtype=torch.float64)
        empty = self.num_pairs == 0
        return {
            f"auc@{self.max_threshold}": nan if empty else auc_from_histogram(self.histogram, n),
            f"rra@{tau}": nan if empty else 100.0 * self.rot_accurate / n,
            f"rta@{tau}": nan if empty else 100.0 * self.trans_accurate / n,
            "rot_error_mean": self.rot_error_sum / nf,
            "trans_error_mean": self.trans_error_sum / nf,
        }
