"""Gradient-based cross-layer rank allocation (QSVD): rank every singular value of every layer together.

Let a factorized matrix (one ``nn.Linear``, or a joint q/k/v group stacked along outputs) be
``W (m x n)`` and its transformed SVD ``W T = Σ_i σ_i u_i v_iᵀ`` (T from the method: ``I``, ASVD
scaling, or a Gram square root).  Dropping component ``i`` changes ``W`` by
``-σ_i u_i v_iᵀ T⁻¹``, so to first order the calibration loss ``L`` changes by

    ΔL_i ≈ -σ_i u_iᵀ G_T v_i,      G_T = ∂L/∂(W T) = G T⁻ᵀ,   G = ∂L/∂W

i.e. ``σ_i u_iᵀ G r_i`` with ``r_iᵀ = v_iᵀ T⁻¹`` (the method's ``unmap``).  The importance is the
mean over calibration batches of its square, ``I_i = mean_b (σ_i u_iᵀ G_b r_i)²`` (use batches
of one sample for the per-sample mean of the paper).  ``G_b`` comes from one backward pass per
batch, with gradients enabled only for the targeted weights.

Selection under one parameter budget ``B`` (e.g. ``(1-ρ) Σ m n`` of the targeted matrices):
keeping a component of an ``m x n`` matrix costs ``m + n``.  Every matrix first keeps
``min_rank`` components (its leading ones); the remaining components of all matrices are
sorted by importance per parameter ``I_i / (m + n)`` (plain importance order when all matrices
have the same shape, as all joint-QKV groups of one model do) and added greedily, skipping any
that no longer fits, so the total never exceeds ``B``.

What is kept -- ``mode``:
- ``"count"`` (default): each matrix keeps its *leading* ``k`` components, ``k`` = the number the
  global ranking selected for it.  For a fixed count the leading triplets minimize the
  calibration error in the method's space (Eckart-Young), and the gradient estimate is
  first-order and noisy, so it is used only to decide *how many* per matrix (``Recipe.components:
  leading``).
- ``"subset"``: exactly the selected components (not necessarily the leading ones), as in the
  paper; joint QKV builds its factors from those triplets (``Recipe.components: chosen``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compression.methods import Method, MethodConfig, build_method, thin_svd
from compression.stats import ActivationStats, shared_reads

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, object], torch.Tensor]


def _as_groups(layer_names: Sequence[str] | Mapping[str, Sequence[str]]) -> dict[str, list[str]]:
    if isinstance(layer_names, Mapping):
        return {k: list(v) for k, v in layer_names.items()}
    return {n: [n] for n in layer_names}


def targeted_backwards(model: nn.Module, layers: Iterable[nn.Module], batches: Iterable, loss_fn: LossFn
                       ) -> Iterator[None]:
    """One backward of ``loss_fn(model, batch)`` per batch with gradients enabled for the ``layers``' weights
    only; yields after each (their ``.grad`` set, cleared before the next).  The model's ``requires_grad``
    flags are restored and every gradient cleared afterwards; a non-finite loss is an error naming the batch."""
    layers = list(layers)
    flags = {p: p.requires_grad for p in model.parameters()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for mod in layers:
            mod.weight.requires_grad_(True)
            mod.weight.grad = None
        for count, batch in enumerate(batches):
            with torch.enable_grad():
                loss = loss_fn(model, batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"non-finite calibration loss on batch {count}")
                loss.backward()
            yield
            for mod in layers:
                mod.weight.grad = None
    finally:
        for p, flag in flags.items():
            p.requires_grad_(flag)
            p.grad = None


@dataclass
class _Basis:
    u: torch.Tensor  # (m x k)
    right: torch.Tensor  # (k x n): rows v_iᵀ T⁻¹
    sigma: torch.Tensor  # (k,)


def gradient_importance(
    model: nn.Module,
    layer_names: Sequence[str] | Mapping[str, Sequence[str]],
    batches: Iterable,
    loss_fn: LossFn,
    method: Method | MethodConfig | str,
    stats: ActivationStats | None,
    device: str | torch.device | None = None,
) -> dict[str, torch.Tensor]:
    """``key -> I (k,)`` float64 CPU, aligned with the descending singular values of each matrix.

    ``layer_names``: ``nn.Linear`` names (one matrix each) or ``key -> [names]`` for joint groups
    stacked along outputs (they must share one input, e.g. q/k/v).  ``loss_fn(model, batch)``
    returns the scalar calibration loss (e.g. ``model(**batch, labels=batch["input_ids"]).loss``).
    The model's parameters keep their ``requires_grad`` flags and gradients are cleared afterwards.
    """
    if not isinstance(method, Method):
        method = build_method(method)
    groups = _as_groups(layer_names)
    modules = {n: model.get_submodule(n) for names in groups.values() for n in names}
    for n, mod in modules.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"gradient_importance: {n!r} is a {type(mod).__name__}; run it before compression")
    dev = torch.device(device) if device is not None else None
    bases: dict[str, _Basis] = {}
    streams = {key: stats[names[0]] if stats is not None and names[0] in stats else None
               for key, names in groups.items()}
    # matrices reading one input share its whitening factor (compression.stats.shared_reads)
    with torch.no_grad(), shared_reads([st for st in streams.values() if st is not None]):
        for key, names in groups.items():
            st = streams[key]
            method.check_stats(st, key)
            w = torch.cat([modules[n].weight.detach().double() for n in names], 0)
            w = w.to(dev) if dev is not None else w
            mat, ctx = method.transformed(w, st, key)
            u, s, vh = thin_svd(mat, method.config.solver, key)
            bases[key] = _Basis(method.unmap_left(u, ctx), method.unmap(vh, ctx), s)
    sums = {k: torch.zeros_like(b.sigma) for k, b in bases.items()}
    count = 0
    for _ in targeted_backwards(model, modules.values(), batches, loss_fn):
        with torch.no_grad():
            for key, names in groups.items():
                b = bases[key]
                g = torch.cat([modules[n].weight.grad.double() for n in names], 0).to(b.u.device)
                score = b.sigma * ((b.u.T @ g) * b.right).sum(1)
                sums[key] += score.square()
        count += 1
    if count == 0:
        raise ValueError("gradient_importance: no calibration batches")
    log.info("gradient importance of %d matrices from %d batches", len(groups), count)
    return {k: (v / count).cpu() for k, v in sums.items()}


@dataclass
class GradientAllocation:
    """``ranks[key]`` (components kept), ``components[key]`` (their indices), and the parameter accounting."""

    ranks: dict[str, int]
    components: dict[str, list[int]]
    budget: float  # parameters (an int) without weights, else in cost units
    used: float


def gradient_allocation(
    importance: Mapping[str, torch.Tensor],
    shapes: Mapping[str, tuple[int, int]],
    budget: int | None = None,
    ratio: float | None = None,
    min_rank: int = 1,
    mode: str = "count",
    weights: Mapping[str, float] | None = None,
) -> GradientAllocation:
    """Keep the globally most important components under ``budget`` parameters (see module docstring).

    ``shapes[key] = (m, n)`` of each (stacked) matrix; give ``budget`` in parameters or ``ratio``
    (fraction of ``Σ m n`` removed).  Raises when even ``min_rank`` per matrix does not fit.
    ``weights[key]`` (cost per parameter, e.g. tokens per forward for a FLOPs budget; see
    :mod:`compression.allocation`) makes a component cost ``w (m + n)`` and the budget count
    ``Σ w m n``; ``budget`` / ``used`` are then in those units.
    """
    if mode not in ("count", "subset"):
        raise ValueError(f"mode must be 'count' or 'subset', got {mode!r}")
    if (budget is None) == (ratio is None):
        raise ValueError("give exactly one of budget (parameters kept) and ratio (fraction removed)")
    if set(importance) != set(shapes):
        raise ValueError(f"importance and shapes name different matrices: {sorted(set(importance) ^ set(shapes))[:5]}")
    if weights is not None and (set(weights) != set(shapes) or not all(float(w) > 0 for w in weights.values())):
        raise ValueError("weights must give every matrix of shapes a cost per parameter > 0")
    unit = {k: float(weights[k]) if weights is not None else 1 for k in shapes}
    if ratio is not None:
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"ratio must lie in (0, 1), got {ratio}")
        budget = (1.0 - ratio) * sum(unit[k] * m * n for k, (m, n) in shapes.items())
        budget = int(budget) if weights is None else budget  # weighted budgets are not whole parameters
    cost = {k: unit[k] * (m + n) for k, (m, n) in shapes.items()}
    chosen: dict[str, set[int]] = {k: set(range(min(min_rank, importance[k].numel()))) for k in shapes}
    used = sum(cost[k] * len(v) for k, v in chosen.items())
    if used > budget:
        raise ValueError(f"budget {budget} parameters cannot keep {min_rank} component(s) per matrix ({used} needed)")
    candidates = [(float(importance[k][i]) / cost[k], k, i) for k in shapes for i in range(importance[k].numel())
                  if i not in chosen[k]]
    candidates.sort(key=lambda t: (-t[0], t[1], t[2]))
    for _, k, i in candidates:
        if used + cost[k] <= budget:
            chosen[k].add(i)
            used += cost[k]
    ranks = {k: len(v) for k, v in chosen.items()}
    comps = {k: sorted(v) if mode == "subset" else list(range(ranks[k])) for k, v in chosen.items()}
    if weights is None:
        budget, used = int(budget), int(used)
    return GradientAllocation(ranks, comps, budget, used)


def lm_loss(model: nn.Module, batch: object) -> torch.Tensor:
    """Next-token loss of a causal LM on ``batch`` (dict with ``input_ids``, or a tensor)."""
    if isinstance(batch, Mapping):
        batch = dict(batch)
        labels = batch.pop("labels", batch["input_ids"])
        return model(**batch, labels=labels).loss
    return model(input_ids=batch, labels=batch).loss
