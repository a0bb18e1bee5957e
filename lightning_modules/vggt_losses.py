"""VGGT training losses: confidence-weighted regression (depth, point maps) and the camera loss."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _gradient_term(residual: Tensor, conf: Tensor, valid: Tensor, scales: int = 3) -> Tensor:
    """Confidence-weighted L1 of finite differences of ``residual [N,H,W,C]`` (valid pairs only)."""
    total = residual.new_zeros(())
    for k in range(scales):
        step = 2**k
        r, c, m = residual[:, ::step, ::step], conf[:, ::step, ::step], valid[:, ::step, ::step]
        for dim in (1, 2):
            n = r.shape[dim]
            if n < 2:
                continue
            a, b = r.narrow(dim, 1, n - 1), r.narrow(dim, 0, n - 1)
            pair = m.narrow(dim, 1, n - 1) & m.narrow(dim, 0, n - 1)
            if pair.any():
                diff = (a - b).abs().sum(-1) * c.narrow(dim, 0, n - 1)
                total = total + diff[pair].mean()
    return total / scales


def confidence_regression_loss(
    pred: Tensor, target: Tensor, conf: Tensor, valid: Tensor, alpha: float, gradient_weight: float = 0.0
) -> Tensor:
    """``mean_V [c ‖pred - target‖ - α log c]`` (+ gradient term).

    Shapes: pred / target ``[..., H, W, C]``, conf / valid ``[..., H, W]``.
    """
    if not valid.any():
        return pred.sum() * 0.0
    residual = pred - target
    err = residual.norm(dim=-1) if residual.shape[-1] > 1 else residual[..., 0].abs()
    loss = (conf * err - alpha * torch.log(conf))[valid].mean()
    if gradient_weight > 0:
        h, w, c = residual.shape[-3:]
        loss = loss + gradient_weight * _gradient_term(
            residual.reshape(-1, h, w, c), conf.reshape(-1, h, w), valid.reshape(-1, h, w)
        )
    return loss


def camera_loss(pose_enc_list: list[Tensor], target: Tensor, gamma: float = 0.6, kind: str = "l1") -> Tensor:
    """``(1/K) Σ_k γ^{K-1-k} [ℓ(T) + ℓ(q) + ½ ℓ(fov)]`` over the K refinement outputs ``[B,S,9]``."""
    fn = F.l1_loss if kind == "l1" else F.huber_loss
    total = target.new_zeros(())
    num = len(pose_enc_list)
    for k, pred in enumerate(pose_enc_list):
        term = fn(pred[..., :3], target[..., :3]) + fn(pred[..., 3:7], target[..., 3:7])
        term = term + 0.5 * fn(pred[..., 7:], target[..., 7:])
        total = total + gamma ** (num - 1 - k) * term
    return total / num
