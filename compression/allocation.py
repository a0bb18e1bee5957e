"""Rank allocation: how many singular values each matrix keeps, separate from how they are chosen.

Strategies are a registry (:func:`register_allocation`, :data:`ALLOCATORS`) over *matrices*
(:class:`Matrix`): one ``nn.Linear``, or a joint q/k/v group stacked along its outputs, which is
one matrix to every strategy.  A matrix ``m x n`` at removal ratio ``ρ`` keeps
``r = floor((1-ρ) m n / (m+n))`` (at least 1).

- ``uniform``: every matrix gets the global ratio ``ρ``.
- ``greedy`` / ``greedy_relative``: one budget over every matrix; triplets are added in order of ``σ²``
  (``σ²`` over the matrix's total energy) per parameter they cost.
- ``kfac``: ``greedy`` on the loss each triplet's removal costs to second order, ``½ f̄ σ²`` in the space of
  ``calibration.output_fisher`` (the Kronecker-factored Fisher ``E[g gᵀ] ⊗ E[x xᵀ]``, its output factor
  damped and divided by its mean ``f̄`` in :mod:`compression.output_fisher`, multiplied back here), so
  matrices are compared by what their cuts cost the model's loss rather than their output energy: the
  ranking LLM Surgeon (van der Ouderaa et al., ICLR 2024) makes with the same curvature for structured
  pruning, applied to singular triplets.  Unlike ``gradient`` it takes no backward of its own and
  its per-triplet estimate averages over every gradient token instead of a few sampled batches.
- ``v2_paper``: ``v2`` with the paper's weighting ``w_i = 1 / log L_i`` on the absolute loss (kept
  for comparison; see below why ``v2`` uses ``-log ℓ``).
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
from dataclasses import dataclass, field

import torch

from compression.joint import joint_rank_for_ratio
from compression.lowrank import rank_for_ratio
from compression.targets import layer_type


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
    weighting: str = "relative",
) -> dict[str, float]:
    """Heterogeneous per-layer removal ratios (see module docstring); keys follow ``shapes``.

    ``cost_weights[name]`` (cost per parameter, e.g. tokens per forward) makes the group mean
    cost-weighted; ``None`` weighs every parameter 1 (the parameter budget).  ``weighting``:
    ``relative`` -- ``w = -log ℓ`` of the relative loss (ours); ``paper`` -- ``w = 1 / log L`` of the
    absolute loss ``L = Σ_{i>r} σ_i²`` as SVD-LLM V2 writes it (only meaningful while ``L > 1``; clamped).
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
            rank = rank_for_ratio(*shapes[n], ratio)
            if weighting == "paper":
                absolute = float(spectra[n][rank:].double().square().sum())
                weights[n] = 1.0 / math.log(max(absolute, 1.0 + 1e-9))
            else:
                loss = min(max(relative_loss_at(spectra[n], rank), 1e-12), 1.0 - 1e-12)
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
def token_cost_weights(stats, names: Iterable[str]) -> dict[str, float]:
    """``name -> tokens seen`` by each layer's input during calibration (``ChannelStats.count``).

    Proportional to tokens per forward, so ``2 · weight · m · n`` is proportional to the layer's
    FLOPs: the weights for a FLOPs budget (``Recipe.budget: flops``).
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


# ----------------------------------------------------------------------------- matrices + registry
@dataclass(frozen=True)
class Matrix:
    """One factorized matrix: ``members`` (``nn.Linear`` names) stacked along their outputs.

    A single layer has one member and ``key`` = its name; a joint q/k/v group has three members
    and ``key`` = the attention module's name.  ``kind`` groups matrices for ``v2`` (all
    ``q_proj`` together; all joint groups together).
    """

    key: str
    members: tuple[str, ...]
    out_sizes: tuple[int, ...]
    in_features: int

    @property
    def joint(self) -> bool:
        return len(self.members) > 1

    @property
    def shape(self) -> tuple[int, int]:
        return sum(self.out_sizes), self.in_features

    @property
    def kind(self) -> str:
        return "joint_qkv" if self.joint else layer_type(self.key)

    @property
    def break_even(self) -> int:
        """``floor(m n / (m + n))``: from this rank on the factors cost about as much as the dense weight."""
        m, n = self.shape
        return m * n // (m + n)

    def rank_for_ratio(self, ratio: float) -> int:
        m, n = self.shape
        return joint_rank_for_ratio(self.out_sizes, n, ratio) if self.joint else rank_for_ratio(m, n, ratio)

    def ratio_at(self, rank: int) -> float:
        m, n = self.shape
        return 1.0 - rank * (m + n) / (m * n)


@dataclass
class AllocationInputs:
    """What a strategy may read: the free matrices (those no override fixes), the target ``ratio``,
    cost weights (``None``: parameters), and lazily the spectra / gradient importances."""

    matrices: dict[str, Matrix]
    ratio: float
    max_ratio: float = 0.95
    min_rank: int = 1
    cost: dict[str, float] | None = None
    spectrum: Callable[[str], torch.Tensor] | None = None
    importance: Mapping[str, torch.Tensor] | None = None
    components: str = "leading"
    budget: float | None = None  # global strategies: explicit budget instead of (1 - ratio) Σ c m n
    loss_scale: Mapping[str, float] | None = None  # kfac: each matrix's mean output Fisher (OutputWeighted.scales)

    def shapes(self) -> dict[str, tuple[int, int]]:
        return {k: m.shape for k, m in self.matrices.items()}

    def spectra(self) -> dict[str, torch.Tensor]:
        if self.spectrum is None:
            raise ValueError("this allocation needs the matrices' spectra; no spectrum source was given")
        return {k: self.spectrum(k) for k in self.matrices}


@dataclass
class AllocationResult:
    """``ranks[key]``; ``ratios[key]`` the removal ratio a strategy assigned (before the rank was
    floored; strategies that decide ranks directly leave it out); ``components[key]`` when a strategy
    keeps non-leading triplets; ``spectra`` it computed (for plots); ``dense`` = keys kept dense."""

    ranks: dict[str, int]
    ratios: dict[str, float] = field(default_factory=dict)
    components: dict[str, list[int]] = field(default_factory=dict)
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    dense: list[str] = field(default_factory=list)
    note: str = ""


@dataclass(frozen=True)
class Allocator:
    name: str
    fn: Callable[[AllocationInputs], AllocationResult]
    needs: frozenset[str]  # "spectra" and/or "importance"
    global_budget: bool  # one budget over every matrix (dense_above_break_even applies)


ALLOCATORS: dict[str, Allocator] = {}


def register_allocation(name: str, needs: Iterable[str] = (), global_budget: bool = False):
    """Decorator: make ``fn(inputs) -> AllocationResult`` the strategy ``name``."""

    def wrap(fn: Callable[[AllocationInputs], AllocationResult]):
        if name in ALLOCATORS:
            raise ValueError(f"allocation {name!r} registered twice")
        ALLOCATORS[name] = Allocator(name, fn, frozenset(needs), global_budget)
        return fn

    return wrap


@register_allocation("uniform")
def _uniform(inp: AllocationInputs) -> AllocationResult:
    return AllocationResult({k: m.rank_for_ratio(inp.ratio) for k, m in inp.matrices.items()},
                            ratios=dict.fromkeys(inp.matrices, inp.ratio))


def _v2(inp: AllocationInputs, weighting: str) -> AllocationResult:
    spectra = inp.spectra()
    kinds = {k: m.kind for k, m in inp.matrices.items()}
    ratios = v2_ratios(inp.shapes(), spectra, inp.ratio, inp.max_ratio, group_of=kinds.__getitem__,
                       cost_weights=inp.cost, weighting=weighting)
    return AllocationResult({k: m.rank_for_ratio(ratios[k]) for k, m in inp.matrices.items()}, ratios=ratios,
                            spectra=spectra)


@register_allocation("v2", needs=("spectra",))
def _v2_relative(inp: AllocationInputs) -> AllocationResult:
    return _v2(inp, "relative")


@register_allocation("v2_paper", needs=("spectra",))
def _v2_paper(inp: AllocationInputs) -> AllocationResult:
    return _v2(inp, "paper")


def _budget(inp: AllocationInputs) -> float:
    if inp.budget is not None:
        return inp.budget
    return (1.0 - inp.ratio) * sum(_unit(inp, k) * m * n for k, (m, n) in inp.shapes().items())


def _unit(inp: AllocationInputs, key: str) -> float:
    return float(inp.cost[key]) if inp.cost else 1.0


def _greedy(inp: AllocationInputs, relative: bool, scale: Mapping[str, float] | None = None) -> AllocationResult:
    """Keep ``min_rank`` leading triplets each, then add triplets in order of error removed per cost
    (``scale[key]`` times ``σ²``: the loss a triplet's removal costs, when given)."""
    spectra = inp.spectra()
    budget = _budget(inp)
    shapes = inp.shapes()
    cost = {k: _unit(inp, k) * (m + n) for k, (m, n) in shapes.items()}
    ranks = {k: min(inp.min_rank, spectra[k].numel()) for k in shapes}
    used = sum(cost[k] * ranks[k] for k in shapes)
    if used > budget:
        raise ValueError(f"the budget cannot keep {inp.min_rank} component(s) per matrix; lower min_rank or ratio")
    candidates = []
    for key, sigma in spectra.items():
        energy = sigma.double().square()
        if relative:  # σ² over the matrix's energy
            total = float(energy.sum())
            divisor = total if total > 0 else 1.0
        else:  # σ², times the loss scale when given
            divisor = 1.0 / float(scale[key]) if scale is not None else 1.0
        candidates += [(float(e) / divisor / cost[key], key, j) for j, e in enumerate(energy.tolist())
                       if j >= ranks[key]]
    candidates.sort(key=lambda t: (-t[0], t[1], t[2]))
    for _, key, j in candidates:  # σ descend within a matrix, so its indices arrive in order
        if j == ranks[key] and used + cost[key] <= budget:
            ranks[key] += 1
            used += cost[key]
    return AllocationResult(ranks, spectra=spectra)


@register_allocation("greedy", needs=("spectra",), global_budget=True)
def _greedy_absolute(inp: AllocationInputs) -> AllocationResult:
    return _greedy(inp, relative=False)


@register_allocation("greedy_relative", needs=("spectra",), global_budget=True)
def _greedy_relative(inp: AllocationInputs) -> AllocationResult:
    return _greedy(inp, relative=True)


@register_allocation("kfac", needs=("spectra",), global_budget=True)
def _kfac(inp: AllocationInputs) -> AllocationResult:
    """``greedy`` on the Kronecker-factored loss: in the output-Fisher-weighted whitened space
    (:class:`compression.output_fisher.OutputWeighted`) dropping triplet ``i`` of matrix ``k`` costs
    ``ΔL ≈ ½ f̄_k σ_i²`` (``f̄_k``: the mean of its damped output Fisher, the scale the row weights divide out),
    so every triplet of every matrix is ranked on one scale, per parameter it costs."""
    if inp.loss_scale is None:
        raise ValueError("allocation 'kfac' ranks by the output-Fisher-weighted loss: set calibration.output_fisher")
    missing = sorted(set(inp.matrices) - set(inp.loss_scale))
    if missing:
        raise ValueError(f"allocation 'kfac': no output Fisher scale for matrices {missing[:5]}")
    return _greedy(inp, relative=False, scale=inp.loss_scale)


@register_allocation("gradient", needs=("importance",), global_budget=True)
def _gradient(inp: AllocationInputs) -> AllocationResult:
    from compression.gradient_allocation import gradient_allocation

    if inp.importance is None:
        raise ValueError("allocation 'gradient' needs gradient importances (calibration batches and a loss)")
    missing = sorted(set(inp.matrices) - set(inp.importance))
    if missing:
        raise ValueError(f"no gradient importance for matrices {missing[:5]}")
    chosen = gradient_allocation({k: inp.importance[k] for k in inp.matrices}, inp.shapes(), budget=_budget(inp),
                                 min_rank=inp.min_rank, mode="subset" if inp.components == "chosen" else "count",
                                 weights=inp.cost)
    components = ({k: c for k, c in chosen.components.items() if inp.matrices[k].joint}
                  if inp.components == "chosen" else {})
    return AllocationResult(chosen.ranks, components=components,
                            note=f"kept {chosen.used:g} of a {chosen.budget:g} budget")


def run_allocation(name: str, inp: AllocationInputs, dense_above_break_even: bool = False) -> AllocationResult:
    """Run strategy ``name``; with ``dense_above_break_even`` (global strategies) matrices whose rank
    reaches their break-even stay dense and the rest of the budget is allocated again."""
    if name not in ALLOCATORS:
        raise ValueError(f"unknown allocation {name!r}; choose one of {sorted(ALLOCATORS)}")
    allocator = ALLOCATORS[name]
    if not (dense_above_break_even and allocator.global_budget):
        return allocator.fn(inp)
    budget = _budget(inp)
    dense: list[str] = []
    spectra: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}

    def spectrum(key: str) -> torch.Tensor:
        if key not in cache:
            cache[key] = inp.spectrum(key)
        return cache[key]

    while True:
        free = {k: m for k, m in inp.matrices.items() if k not in dense}
        left = budget - sum(_unit(inp, k) * inp.matrices[k].shape[0] * inp.matrices[k].shape[1] for k in dense)
        free_cost = sum(_unit(inp, k) * m.shape[0] * m.shape[1] for k, m in free.items())
        if not free or left <= 0:
            raise ValueError("every matrix would stay dense: the ratio is too small to factorize any of them")
        sub = AllocationInputs(free, 1.0 - left / free_cost, inp.max_ratio, inp.min_rank,
                               {k: inp.cost[k] for k in free} if inp.cost else None,
                               spectrum if inp.spectrum is not None else None, inp.importance, inp.components,
                               budget=left, loss_scale=inp.loss_scale)
        result = allocator.fn(sub)
        spectra.update(result.spectra)
        crossed = [k for k in free if result.ranks[k] >= free[k].break_even]
        if not crossed:
            result.dense, result.spectra = dense, spectra
            return result
        dense += crossed
