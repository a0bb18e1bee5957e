"""``compress_(model, config, stats)``: the single in-place entry point.

Order of work, chosen so that bad input never leaves a half-compressed model:

1. select target layers (every pattern must match), build the method, resolve overrides;
2. check that statistics exist and are finite for every layer that needs them;
3. allocate per-layer ranks (:func:`allocate`: fixed ranks, overrides, ``uniform`` / ``v2``);
4. decompose and swap layer by layer, keeping the originals; if any layer fails (e.g. a
   non-finite SVD), every swapped layer is put back before the error propagates.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from compression import allocation as alloc
from compression.lowrank import LowRankLinear, linear_num_parameters, rank_for_ratio
from compression.methods import MethodConfig, build_method
from compression.plan import make_plan, set_submodule
from compression.report import CompressionReport, LayerReport
from compression.stats import ActivationStats
from compression.targets import name_matches, select_targets
from compression.whitening import SVDLLMConfig

log = logging.getLogger(__name__)


def _check_ratio(value: float, what: str) -> None:
    if not 0.0 < value < 1.0:
        raise ValueError(
            f"{what} must lie in (0, 1): it is the fraction of targeted parameters REMOVED "
            f"(0.2 keeps 80 %), got {value}"
        )


@dataclass
class CompressionConfig:
    """What to compress and how.

    Args:
        method: a method config (``SVDConfig``, ``ASVDConfig``, ``SVDLLMConfig``,
            ``SVDLLMV2Config``) or a registered method name with default settings.
        ratio: fraction of the targeted parameters to remove, in (0, 1).
        allocation: ``"uniform"`` or ``"v2"`` (see :mod:`compression.allocation`).
        targets: module-name patterns to compress; ``None`` = every eligible ``nn.Linear``.
        exclude: patterns removed from the targets.
        overrides: ordered ``pattern -> {"ratio": x}`` or ``{"rank": r}``; the first
            matching pattern fixes that layer's ratio or rank, outside the allocation.
        max_ratio: upper bound on any one layer's removal ratio under ``v2``.
        ranks: exact layer name -> rank, decided beforehand by an allocator (e.g. the
            rank-reallocation callback); these layers skip ``allocation`` and ``overrides``.
        device: where the float64 maths runs (default: each layer's own device).
        cost_weights: ordered ``pattern -> cost per parameter`` (first match wins; every
            targeted layer must be matched), e.g. tokens per forward so that the budget counts
            FLOPs: ``ratio`` becomes the fraction of ``Σ weight · m · n`` removed.  ``uniform``
            is unaffected (it removes ``ratio`` of every layer's FLOPs already); ``v2`` keeps the
            cost-weighted mean per group (:mod:`compression.allocation`).  Empty = parameters.
    """

    method: MethodConfig | str = field(default_factory=SVDLLMConfig)
    ratio: float = 0.2
    allocation: str = "uniform"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    max_ratio: float = 0.95
    ranks: dict[str, int] = field(default_factory=dict)
    device: str | None = None
    cost_weights: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.method, str):
            self.method = build_method(self.method).config
        _check_ratio(self.ratio, "ratio")
        _check_ratio(self.max_ratio, "max_ratio")
        if self.allocation not in alloc.ALLOCATIONS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {alloc.ALLOCATIONS}")
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in ("ratio", "rank"):
                raise ValueError(f"override {pattern!r} must be {{'ratio': x}} or {{'rank': r}}, got {spec!r}")
            if "ratio" in spec:
                _check_ratio(float(spec["ratio"]), f"override {pattern!r} ratio")
            elif int(spec["rank"]) < 1:
                raise ValueError(f"override {pattern!r} rank must be >= 1, got {spec['rank']}")
        for name, rank in self.ranks.items():
            if int(rank) < 1:
                raise ValueError(f"rank for layer {name!r} must be >= 1, got {rank}")
        for pattern, weight in self.cost_weights.items():
            if not (isinstance(weight, int | float) and math.isfinite(weight) and weight > 0):
                raise ValueError(f"cost_weights[{pattern!r}] must be a finite number > 0, got {weight!r}")


@dataclass
class Allocation:
    """Per-layer decision: ``ranks[name]``, the removal ratio each stands for, and (for ``v2``)
    the singular values it was derived from (float64, CPU)."""

    ranks: dict[str, int]
    ratios: dict[str, float]
    spectra: dict[str, torch.Tensor] = field(default_factory=dict)
    cost_weights: dict[str, float] = field(default_factory=dict)  # per layer, when the config gave them

    def cost_ratio(self, shapes: Mapping[str, tuple[int, int]]) -> float:
        """Fraction of the targeted cost (``Σ c m n``; parameters without cost weights) removed."""
        weights = self.cost_weights or None
        dense = alloc.cost_of(shapes, None, weights)
        return 1.0 - alloc.cost_of(shapes, self.ranks, weights) / dense if dense > 0 else 0.0


def allocate(
    model: nn.Module,
    config: CompressionConfig,
    stats: ActivationStats | None = None,
    layers: dict[str, nn.Linear] | None = None,
) -> Allocation:
    """Decide every targeted layer's rank without touching the model.

    Precedence: ``config.ranks`` (exact names) > ``config.overrides`` (first matching
    pattern) > ``config.allocation`` over the remaining layers at ``config.ratio``.
    """
    if layers is None:
        selection = select_targets(model, config.targets, config.exclude, list(config.overrides))
        layers = {n: model.get_submodule(n) for n in selection.names}
    unknown = sorted(set(config.ranks) - set(layers))
    if unknown:
        raise ValueError(f"ranks given for layers that are not targeted: {unknown[:5]}")
    method = build_method(config.method)
    device = torch.device(config.device) if config.device else None
    fixed: dict[str, dict[str, float]] = {n: {"rank": int(r)} for n, r in config.ranks.items()}
    for name in layers:
        if name in fixed:
            continue
        for pattern, spec in config.overrides.items():
            if name_matches(name, pattern):
                fixed[name] = dict(spec)
                break
    free = [n for n in layers if n not in fixed]
    shapes = {n: (layers[n].out_features, layers[n].in_features) for n in layers}
    weights = alloc.resolve_cost_weights(layers, config.cost_weights) if config.cost_weights else {}
    spectra: dict[str, torch.Tensor] = {}
    if config.allocation == "v2" and free:
        spectra = {n: method.spectrum(_weight(layers[n], device), _stats_for(stats, n), n).cpu() for n in free}
        ratios = alloc.v2_ratios({n: shapes[n] for n in free}, spectra, config.ratio, config.max_ratio,
                                 cost_weights=weights or None)
    else:
        ratios = alloc.uniform_ratios(free, config.ratio)
    out = Allocation({}, {}, spectra, weights)
    for name in layers:
        m, n = shapes[name]
        if name in fixed and "rank" in fixed[name]:
            rank = int(fixed[name]["rank"])
            if rank > min(m, n):
                raise ValueError(f"rank {rank} for layer {name!r} exceeds min{(m, n)} = {min(m, n)}")
            out.ranks[name], out.ratios[name] = rank, 1.0 - rank * (m + n) / (m * n)
        else:
            ratio = float(fixed[name]["ratio"]) if name in fixed else ratios[name]
            out.ranks[name], out.ratios[name] = rank_for_ratio(m, n, ratio), ratio
    return out


def _weight(layer: nn.Linear, device: torch.device | None) -> torch.Tensor:
    w = layer.weight.detach()
    return w.to(device) if device is not None else w


def _stats_for(stats: ActivationStats | None, name: str):
    if stats is None or name not in stats:
        return None
    return stats[name]


def compress_(
    model: nn.Module,
    config: CompressionConfig | None = None,
    stats: ActivationStats | None = None,
) -> CompressionReport:
    """Factorize the targeted ``nn.Linear`` layers of ``model`` in place; return the report.

    ``stats`` are the calibration statistics (:func:`compression.stats.collect_stats`);
    required by every method except ``svd``.  On any error the model is left as it was.
    """
    config = config or CompressionConfig()
    start = time.perf_counter()
    method = build_method(config.method)
    selection = select_targets(model, config.targets, config.exclude, list(config.overrides))
    modules = dict(model.named_modules())
    layers: dict[str, nn.Linear] = {n: modules[n] for n in selection.names}
    for name, layer in layers.items():
        if not torch.isfinite(layer.weight).all():
            raise FloatingPointError(f"weight of layer {name!r} contains NaN/inf; refusing to compress it")
        if method.needs:
            method.check_stats(_stats_for(stats, name), name)
    device = torch.device(config.device) if config.device else None
    model_params_before = sum(p.numel() for p in model.parameters())
    allocation = allocate(model, config, stats, layers)

    swapped: list[tuple[str, nn.Linear]] = []
    reports: list[LayerReport] = []
    try:
        for name, layer in layers.items():
            rank, ratio = allocation.ranks[name], allocation.ratios[name]
            factors = method.decompose(_weight(layer, device), _stats_for(stats, name), rank, name)
            rank = factors.up.shape[1]
            new = LowRankLinear.from_linear(layer, rank, factors.up, factors.down)
            set_submodule(model, name, new)
            swapped.append((name, layer))
            reports.append(LayerReport(
                name=name, out_features=layer.out_features, in_features=layer.in_features, rank=rank,
                params_before=linear_num_parameters(layer), params_after=new.num_parameters(),
                ratio_assigned=ratio, truncation_loss=factors.truncation_loss,
                relative_loss=factors.relative_loss,
            ))
            del factors
    except BaseException:
        for name, layer in reversed(swapped):
            set_submodule(model, name, layer)
        log.error("compression failed; %d already swapped layers were restored", len(swapped))
        raise

    plan = make_plan(
        method.config.to_dict(), config.ratio, config.allocation,
        {r.name: {"rank": r.rank, "in_features": r.in_features, "out_features": r.out_features,
                  "bias": layers[r.name].bias is not None} for r in reports},
    )
    report = CompressionReport(
        method=method.name, allocation=config.allocation, ratio=config.ratio, layers=reports,
        model_params_before=model_params_before,
        model_params_after=sum(p.numel() for p in model.parameters()),
        plan=plan, skipped=selection.skipped, seconds=time.perf_counter() - start,
    )
    log.info("%s", report.to_table(max_rows=0))
    return report
