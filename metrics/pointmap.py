"""Point-map accuracy / completeness / Chamfer after similarity alignment (DUSt3R / VGGT style).

Per sample, take the valid pixels ``V`` (GT mask, finite values) of the predicted point map
``P̂ [S,H,W,3]`` and the ground truth ``P``.  The prediction lives in an arbitrary frame and
scale (VGGT: the first camera's), so it is first aligned with the Umeyama similarity fitted
on the pixel correspondences, ``(s, R, t) = argmin Σ_V |P_p - (s R P̂_p + t)|²`` (see
:mod:`metrics.alignment`), giving ``A = {s R P̂_p + t}`` and ``G = {P_p}``.  Then

    Accuracy     = mean_{a∈A} min_{g∈G} |a - g|     (how close predictions are to the GT surface)
    Completeness = mean_{g∈G} min_{a∈A} |a - g|     (how well the GT surface is covered)
    Chamfer      = (Accuracy + Completeness) / 2     ("Overall" in the VGGT / DUSt3R tables)

Medians of the same distances are reported too.  Distances are in ground-truth units.
Nearest neighbours are exact, computed with ``torch.cdist`` in chunks (bounded memory);
when there are more than ``max_points`` valid pixels, the same random subset of pixels is
kept in both clouds, drawn with a fixed-seed ``torch.Generator`` (the same seed every
update, so results are reproducible and a perfect prediction still scores exactly 0).
The final values are means over samples.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor
from torchmetrics import Metric

from metrics.alignment import apply_similarity, umeyama

_KEYS = ("accuracy", "completeness", "chamfer", "accuracy_median", "completeness_median")


def nearest_neighbor_distances(query: Tensor, reference: Tensor, max_chunk_elements: int = 2**22) -> Tensor:
    """``min_j |query_i - reference_j|`` for each query ``[N, 3]`` against ``[M, 3]`` -> ``[N]``.

    Queries are processed in chunks so that at most ``max_chunk_elements`` distances are
    materialised at once.
    """
    if reference.shape[0] == 0:
        return torch.full((query.shape[0],), math.inf, dtype=query.dtype, device=query.device)
    chunk = max(1, max_chunk_elements // max(1, reference.shape[0]))
    out = [torch.cdist(q, reference).min(dim=1).values for q in query.split(chunk)]
    return torch.cat(out) if out else query.new_zeros(0)


def subsample(points: Tensor, max_points: int, generator: torch.Generator) -> Tensor:
    """At most ``max_points`` rows of ``points [N, D]`` chosen with ``generator``."""
    if points.shape[0] <= max_points:
        return points
    idx = torch.randperm(points.shape[0], generator=generator)[:max_points]
    return points[idx.to(points.device)]


def pointmap_errors(
    pred_points: Tensor,
    gt_points: Tensor,
    mask: Tensor | None = None,
    align: str = "sim3",
    max_points: int = 20000,
    seed: int = 0,
) -> dict[str, Tensor]:
    """Accuracy / completeness / Chamfer of one sample.

    Args:
        pred_points, gt_points: ``[..., 3]`` (e.g. ``[S, H, W, 3]``) pixel-aligned point maps.
        mask: ``[...]`` bool validity of the GT, or ``None``.
        align: ``"sim3"`` (Umeyama with scale), ``"se3"`` (rigid) or ``"none"``.
        max_points: cap on the number of (pixel-aligned) points used.
        seed: seed of the sub-sampling generator.

    Returns:
        Dict of scalar float64 tensors with keys ``accuracy``, ``completeness``, ``chamfer``,
        ``accuracy_median``, ``completeness_median``.
    """
    if pred_points.shape != gt_points.shape or pred_points.shape[-1] != 3:
        raise ValueError(
            f"point maps must have equal shapes [..., 3], got {tuple(pred_points.shape)} and {tuple(gt_points.shape)}"
        )
    if align not in ("sim3", "se3", "none"):
        raise ValueError(f"align must be 'sim3', 'se3' or 'none', got {align!r}")
    pred, gt = pred_points.reshape(-1, 3).double(), gt_points.reshape(-1, 3).double()
    valid = torch.isfinite(pred).all(-1) & torch.isfinite(gt).all(-1)
    if mask is not None:
        valid &= mask.reshape(-1).bool()
    pred, gt = pred[valid], gt[valid]
    if pred.shape[0] < 3:
        raise ValueError(f"a sample has {pred.shape[0]} valid points; at least 3 are needed")
    # Both clouds come from the same pixels: sub-sample pixels, keeping the correspondence.
    pairs = subsample(torch.cat([pred, gt], dim=1), max_points, torch.Generator().manual_seed(seed))
    pred, gt = pairs[:, :3], pairs[:, 3:]
    if align != "none":
        s, r, t = umeyama(pred, gt, with_scale=align == "sim3")
        pred = apply_similarity(pred, s.to(pred.device), r.to(pred.device), t.to(pred.device))
    acc = nearest_neighbor_distances(pred, gt)
    comp = nearest_neighbor_distances(gt, pred)
    return {
        "accuracy": acc.mean(),
        "completeness": comp.mean(),
        "chamfer": (acc.mean() + comp.mean()) / 2,
        "accuracy_median": acc.median(),
        "completeness_median": comp.median(),
    }


class PointMapMetric(Metric):
    """Sample-averaged point-map accuracy / completeness / Chamfer (see module docstring).

    Args:
        align: ``"sim3"``, ``"se3"`` or ``"none"``.
        max_points: cap on the number of pixel-aligned points per sample.
        seed: sub-sampling seed.
    """

    full_state_update = False
    higher_is_better = False

    def __init__(self, align: str = "sim3", max_points: int = 20000, seed: int = 0, **kwargs) -> None:
        super().__init__(**kwargs)
        self.align, self.max_points, self.seed = align, max_points, seed
        for key in _KEYS:
            self.add_state(f"{key}_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("num_samples", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, pred_points: Tensor, gt_points: Tensor, masks: Tensor | None = None) -> None:
        """Add a batch: point maps ``[B, S, H, W, 3]`` (or one ``[S, H, W, 3]``), masks ``[B, S, H, W]``."""
        if pred_points.dim() == 4:
            pred_points, gt_points = pred_points[None], gt_points[None]
            masks = None if masks is None else masks[None]
        for b in range(pred_points.shape[0]):
            errs = pointmap_errors(
                pred_points[b],
                gt_points[b],
                None if masks is None else masks[b],
                self.align,
                self.max_points,
                self.seed,
            )
            for key in _KEYS:
                state = getattr(self, f"{key}_sum")
                state += errs[key].to(state.device)
            self.num_samples += 1

    def compute(self) -> dict[str, Tensor]:
        n = self.num_samples.double()
        if self.num_samples == 0:
            return {key: torch.tensor(math.nan, dtype=torch.float64) for key in _KEYS}
        return {key: getattr(self, f"{key}_sum") / n for key in _KEYS}
