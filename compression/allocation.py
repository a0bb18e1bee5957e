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

Cost-weighted budgets (``cost_weights``: FLOPs instead of parameters).  A caller may give each
layer a cost per parameter ``c_i`` -- for FLOPs, the tokens that pass through the layer per
forward ``T_i``, since a Linear costs ``2 T_i m n`` FLOPs dense and ``2 T_i r (m + n)`` factored.
The budget then counts ``c_i P_i`` instead of ``P_i``, and "ratio" is the fraction of the
targeted *cost* removed, ``Σ c_i (P_i - P'_i) = ρ Σ c_i P_i``:

- ``uniform`` is unchanged: removing ``ρ`` of every layer's parameters removes ``ρ`` of its
  FLOPs too, so the two readings of ``ρ`` coincide (up to rank flooring);
- ``v2`` keeps ``Σ ρ_i c_i P_i = ρ Σ c_i P_i`` in each group (water-filling on ``c_i P_i``);
  within a group of one layer type the token counts are usually equal and nothing changes;
- a global allocator (e.g. :func:`compression.gradient_allocation.gradient_allocation` with
  ``weights``) is where it matters: a component of layer ``i`` then costs ``c_i (m + n)``, so a
  layer that sees few tokens (VGGT's camera trunk sees only the camera tokens, 4 per frame over
  its refinement loop, against every patch token of every frame in the aggregator) is nearly
  free to keep and the cuts move to where the FLOPs are.

:func:`token_cost_weights` reads ``T_i`` from calibration statistics (``ChannelStats.count`` is
the number of tokens a layer's input hook saw, so ratios between layers are ratios of tokens
per forward; the absolute scale does not matter).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping

import torch

from compression.lowrank import rank_for_ratio
from compression.targets import layer_type, name_matches

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
    cost_weights: Mapping[str, float] | None = None,
) -> dict[str, float]:
    """Heterogeneous per-layer removal ratios (see module docstring); keys follow ``shapes``.

    ``cost_weights[name]`` (cost per parameter, e.g. tokens per forward) makes the group mean
    cost-weighted; ``None`` weighs every parameter 1 (the parameter budget).
    """
    if not 0.0 < ratio <= max_ratio < 1.0:
        raise ValueError(f"need 0 < ratio <= max_ratio < 1, got ratio={ratio}, max_ratio={max_ratio}")
    groups: dict[str, list[str]] = {}
    for name in shapes:
        groups.setdefault(group_of(name), []).append(name)
    out: dict[str, float] = {}
    for members in groups.values():
        params = {n: shapes[n][0] * shapes[n][1] * (cost_weights[n] if cost_weights else 1.0) for n in members}
        weights = {}
        for n in members:
            loss = relative_loss_at(spectra[n], rank_for_ratio(*shapes[n], ratio))
            loss = min(max(loss, 1e-12), 1.0 - 1e-12)
            weights[n] = -math.log(loss)
        out.update(_spread(weights, params, ratio, max_ratio))
    return out


def _spread(
    weights: dict[str, float], params: dict[str, float], ratio: float, max_ratio: float
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


# ----------------------------------------------------------------------------- cost weights
def resolve_cost_weights(names: Iterable[str], patterns: Mapping[str, float]) -> dict[str, float]:
    """``name -> cost per parameter`` from ordered ``pattern -> weight`` (first match wins).

    Every layer must be matched and every pattern must match a layer (a partial map would
    silently weigh the rest 1, which is wrong when weights are token counts); weights must be
    finite and positive.
    """
    names = list(names)
    for pattern, weight in patterns.items():
        if not (math.isfinite(float(weight)) and float(weight) > 0):
            raise ValueError(f"cost weight of {pattern!r} must be finite and > 0, got {weight}")
        if not any(name_matches(n, pattern) for n in names):
            raise ValueError(f"cost_weights pattern {pattern!r} matches no targeted layer (first: {names[:3]})")
    out: dict[str, float] = {}
    for name in names:
        for pattern, weight in patterns.items():
            if name_matches(name, pattern):
                out[name] = float(weight)
                break
    missing = [n for n in names if n not in out]
    if missing:
        raise ValueError(f"cost_weights gives no weight for {len(missing)} targeted layers, e.g. {missing[:3]}; "
                         "add a pattern for them (e.g. '*': 1.0 last)")
    return out


def token_cost_weights(stats, names: Iterable[str]) -> dict[str, float]:
    """``name -> tokens seen`` by each layer's input during calibration (``ChannelStats.count``).

    Proportional to tokens per forward, so ``2 · weight · m · n`` is proportional to the layer's
    FLOPs: the weights for a FLOPs budget (``CompressionConfig.cost_weights``).
    """
    out = {}
    for name in names:
        if stats is None or name not in stats:
            raise ValueError(f"no calibration statistics for {name!r}: collect them for every targeted layer")
        count = stats[name].count
        if count <= 0:
            raise ValueError(f"layer {name!r} saw no calibration tokens; its FLOPs weight would be 0")
        out[name] = float(count)
    return out


def cost_of(shapes: Mapping[str, tuple[int, int]], ranks: Mapping[str, int] | None = None,
            cost_weights: Mapping[str, float] | None = None) -> float:
    """``Σ c_i P_i`` with ``P_i = m n`` (dense, ``ranks`` None) or ``r (m + n)`` (factored)."""
    total = 0.0
    for name, (m, n) in shapes.items():
        params = m * n if ranks is None else ranks[name] * (m + n)
        total += params * (cost_weights[name] if cost_weights else 1.0)
    return total
