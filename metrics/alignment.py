"""Umeyama similarity alignment.

Given corresponding points ``x_i`` (source) and ``y_i`` (target), ``[N, 3]``, and optional
non-negative weights ``w_i``, find ``(s, R, t)`` minimising

    Σ_i w_i || y_i - (s R x_i + t) ||²,   R ∈ SO(3), s > 0.

Closed form (Umeyama 1991, weighted): with normalised weights ``p_i = w_i / Σ w``,
means ``μ_x = Σ p_i x_i``, ``μ_y = Σ p_i y_i``, centred ``x̃ = x - μ_x``, ``ỹ = y - μ_y``,
cross-covariance ``Σ_xy = Σ p_i ỹ_i x̃_iᵀ`` and variance ``σ_x² = Σ p_i |x̃_i|²``; with the
SVD ``Σ_xy = U D Vᵀ`` and ``S = diag(1, 1, det(U) det(V))`` (reflection guard):

    R = U S Vᵀ,   s = tr(D S) / σ_x²,   t = μ_y - s R μ_x.

Computed in float64.  ``with_scale=False`` gives the rigid (Kabsch) solution with s = 1.
"""

from __future__ import annotations

import torch
from torch import Tensor


def umeyama(
    source: Tensor, target: Tensor, weights: Tensor | None = None, with_scale: bool = True
) -> tuple[Tensor, Tensor, Tensor]:
    """Similarity ``(s, R, t)`` with ``target ≈ s R source + t``.

    Args:
        source: ``[N, 3]`` points to move.
        target: ``[N, 3]`` corresponding points.
        weights: ``[N]`` non-negative weights, or ``None`` for uniform.
        with_scale: estimate ``s``; otherwise ``s = 1``.

    Returns:
        ``s`` scalar tensor, ``R [3, 3]``, ``t [3]`` (float64).
    """
    if source.shape != target.shape or source.dim() != 2 or source.shape[-1] != 3:
        raise ValueError(
            f"umeyama expects two [N, 3] tensors of equal shape, got {tuple(source.shape)} and {tuple(target.shape)}"
        )
    x, y = source.double(), target.double()
    w = torch.ones(x.shape[0], dtype=torch.float64, device=x.device) if weights is None else weights.double()
    if w.shape != (x.shape[0],) or (w < 0).any():
        raise ValueError("weights must be a non-negative [N] tensor matching the points")
    total = w.sum()
    if x.shape[0] < 3 or total <= 0:
        raise ValueError(f"umeyama needs at least 3 points with positive total weight, got N={x.shape[0]}")
    p = w / total
    mu_x, mu_y = p @ x, p @ y
    xc, yc = x - mu_x, y - mu_y
    cov = (yc * p[:, None]).T @ xc
    u, d, vh = torch.linalg.svd(cov)
    sign = torch.ones(3, dtype=torch.float64, device=x.device)
    if torch.det(u) * torch.det(vh) < 0:
        sign[-1] = -1.0
    rot = u @ torch.diag(sign) @ vh
    if with_scale:
        var_x = (p * (xc * xc).sum(-1)).sum()
        if var_x <= 0:
            raise ValueError("umeyama: source points are all identical; the scale is undefined")
        scale = (d * sign).sum() / var_x
    else:
        scale = torch.ones((), dtype=torch.float64, device=x.device)
    trans = mu_y - scale * rot @ mu_x
    return scale, rot, trans


def apply_similarity(points: Tensor, scale: Tensor, rot: Tensor, trans: Tensor) -> Tensor:
    """``s R x + t`` for points ``[..., 3]`` (computed in the dtype of ``points``)."""
    dtype = points.dtype
    return (scale.to(dtype) * points @ rot.to(dtype).T) + trans.to(dtype)
