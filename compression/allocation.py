"""Rank allocation: how many singular values each layer keeps, separate from how they are chosen.

A layer ``m x n`` at removal ratio ``ρ`` keeps ``r = floor((1-ρ) m n / (m+n))`` (at least 1).

- ``uniform``: every layer gets the global ratio ``ρ``.
- ``v2`` (SVD-LLM V2, heterogeneous ratios): layers are grouped by type (the module name
  with layer indices wildcarded: all ``q_proj`` together, all ``fc1`` together).  For each
  layer the *relative* theoretical truncation loss at the target ratio is
  ``ℓ = Σ_{i>r} σ_i² / Σ_i σ_i²`` (σ of the method's transformed weight, so for the
  whitening methods this is the fraction of calibration output energy lost).  Within a
  group, layer ``i`` gets the removal ratio

      ρ_i = ρ · w_i · Σ_j P_j / Σ_j w_j P_j,     w_i = -log(ℓ_i)

  (``P`` = parameters of the layer), so the group's parameter-weighted mean ratio stays ``ρ``.
  Why ``-log ℓ``: it is positive and strictly decreasing in the loss for every ``ℓ ∈ (0, 1)``
  (layers that would lose more keep more), it is scale-free (ℓ is a fraction, so the
  activation scale of a layer does not matter), and it compresses the many orders of
  magnitude ℓ spans into a mild spread of ratios.  The paper's ``1 / log(loss)`` uses the
  raw loss, which changes sign at loss 1 and depends on the units of the activations.
  Ratios are clamped to ``[0, max_ratio]`` and the excess is redistributed to the unclamped
  layers of the group so the mean is kept.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping

import torch

from compression.lowrank import rank_for_ratio
from compression.targets import layer_type

ALLOCATIONS = ("uniform", "v2")


def relative_loss_at(sigma: torch.Tensor, rank: int) -> float:
    """``Σ_{i>=rank} σ_i² / Σ σ_i²`` for descending singular values."""
    energy = sigma.double().square()
    total = float(energy.sum())
    return float(energy[rank:].sum()) / total if total > 0 else 0.0


def uniform_ratios(names: list[str], ratio: float) -> dict[str, float]:
    return {n: ratio for n in names}


def v2_ratios(
    shapes: Mapping[str, tuple[int, int]],
    spectra: Mapping[str, torch.Tensor],
    ratio: float,
    max_ratio: float = 0.95,
    group_of: Callable[[str], str] = layer_type,
) -> dict[str, float]:
    """Heterogeneous per-layer removal ratios (see module docstring); keys follow ``shapes``."""
    if not 0.0 < ratio <= max_ratio < 1.0:
        raise ValueError(f"need 0 < ratio <= max_ratio < 1, got ratio={ratio}, max_ratio={max_ratio}")
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(group_of(name), []).append(name)
    out: dict[str, float] = {}
    for members in groups.values():
        params = {n: shapes[n][0] * shapes[n][1] for n in members}
        weights = {}
        for n in members:
            loss = relative_loss_at(spectra[n], rank_for_ratio(*shapes[n], ratio))
            loss = min(max(loss, 1e-12), 1.0 - 1e-12)
            weights[n] = -math.log(loss)
        out.update(_spread(weights, params, ratio, max_ratio))
    return out


def _spread(
    weights: dict[str, float], params: dict[str, int], ratio: float, max_ratio: float
) -> dict[str, float]:
    """``ρ_i ∝ w_i`` with ``Σ ρ_i P_i = ρ Σ P_i`` and ``0 <= ρ_i <= max_ratio`` (water-filling)."""
    budget = ratio * sum(params.values())
    fixed: dict[str, float] = {}
    free = dict(weights)
    while free:
        mass = sum(weights[n] * params[n] for n in free)
        remaining = budget - sum(fixed[n] * params[n] for n in fixed)
        scale = remaining / mass if mass > 0 else 0.0
        over = [n for n in free if weights[n] * scale > max_ratio]
        if not over:
            fixed.update({n: weights[n] * scale for n in free})
            break
        for n in over:
            fixed[n] = max_ratio
            del free[n]
    return fixed
