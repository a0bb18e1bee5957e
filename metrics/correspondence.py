"""Two-view correspondences: matching through predicted point maps, and end-point-error scores.

**Matching by point maps.**  VGGT predicts a world point ``X̂_v(p)`` for every pixel ``p`` of every view
``v`` in one common frame.  A query pixel ``q`` of view 0 (sub-pixel, bilinearly sampled:
``X = X̂_0(q)``) is matched to the pixel of view 1 whose predicted point is nearest::

    m(q) = argmin_p ‖X̂_1(p) - X‖₂

(no visibility test: an occluded query still gets its nearest surface point).  It needs no track
head, so it scores what the dense heads learned; the track head, when trained, is scored the same way.

**Scores** for predicted matches ``m_i`` against ground truth ``g_i`` (pixels of view 1, at the
evaluated resolution): ``EPE = mean_i ‖m_i - g_i‖``, the median, and ``PCK@τ = 100 · mean[‖m_i - g_i‖ < τ]``
for ``τ`` in pixels.  The trivial baseline is the identity ``m(q) = q``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat

DEFAULT_PCK = (1.0, 3.0, 5.0)


def sample_points(point_map: Tensor, queries: Tensor) -> Tensor:
    """Bilinear samples of ``point_map [H, W, C]`` at pixel coordinates ``queries [N, 2]`` (x, y) -> ``[N, C]``."""
    H, W = point_map.shape[:2]
    grid = torch.stack([queries[:, 0] / max(W - 1, 1) * 2 - 1, queries[:, 1] / max(H - 1, 1) * 2 - 1], dim=-1)
    grid = grid.to(point_map.dtype)[None, None]
    out = F.grid_sample(point_map.permute(2, 0, 1)[None], grid, mode="bilinear", align_corners=True)
    return out[0, :, 0].T


def pointmap_matches(points0: Tensor, points1: Tensor, queries: Tensor) -> Tensor:
    """Match ``queries [N, 2]`` of view 0 into view 1 by nearest predicted world point -> ``[N, 2]`` (x, y)."""
    if points0.shape != points1.shape or points0.dim() != 3:
        raise ValueError(f"expected two [H, W, 3] point maps, got {tuple(points0.shape)} and {tuple(points1.shape)}")
    H, W = points1.shape[:2]
    x = sample_points(points0.double(), queries.double())
    dist = torch.cdist(x, points1.double().reshape(-1, points1.shape[-1]))
    idx = dist.argmin(dim=1)
    return torch.stack([idx % W, idx // W], dim=-1).to(queries.dtype)


class MatchingEPE(Metric):
    """End-point error of predicted matches: ``{"epe", "epe_median", "pck@τ"...}`` (pixels, percent)."""

    full_state_update = False
    higher_is_better = False

    def __init__(self, pck: tuple[float, ...] = DEFAULT_PCK, **kwargs) -> None:
        super().__init__(**kwargs)
        self.pck = tuple(float(t) for t in pck)
        self.add_state("errors", default=[], dist_reduce_fx="cat")

    def update(self, predicted: Tensor, target: Tensor) -> None:
        """``predicted`` / ``target``: ``[N, 2]`` pixel coordinates in view 1."""
        if predicted.shape != target.shape or predicted.shape[-1] != 2:
            raise ValueError(f"expected matching [N, 2] points, got {tuple(predicted.shape)} and {tuple(target.shape)}")
        self.errors.append((predicted.double() - target.double()).norm(dim=-1).reshape(-1))

    def compute(self) -> dict[str, Tensor]:
        err = dim_zero_cat(self.errors) if len(self.errors) else torch.zeros(0, dtype=torch.float64)
        if err.numel() == 0:
            nan = torch.tensor(float("nan"), dtype=torch.float64)
            return {"epe": nan, "epe_median": nan, **{f"pck@{t:g}": nan for t in self.pck}}
        out = {"epe": err.mean(), "epe_median": err.median()}
        out.update({f"pck@{t:g}": 100.0 * (err < t).double().mean() for t in self.pck})
        return out
