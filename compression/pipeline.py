"""One recipe on one model, stage by stage: select -> statistics -> allocate -> truncate -> quantize.

:class:`CompressionPipeline` is built once per run from a :class:`~compression.recipe.Recipe`.
Building it resolves and checks everything that can be checked without data: the targets (every
pattern must match), the matrices (a joint q/k/v group is one matrix), the overrides, finite
weights.  Each stage then runs once, in order, and refuses to run out of order:

1. statistics -- :meth:`collect` (or :meth:`set_statistics` with statistics reduced elsewhere,
   e.g. across DDP ranks); only what the method and budget need (Gram for whitening, abs
   statistics for ASVD, token counts for a FLOPs budget);
2. :meth:`importance` -- calibration-loss gradients, only for ``allocation: gradient``; before it (and
   before or after the statistics) :meth:`set_output_fisher`, the output-row weights of
   ``calibration.output_fisher`` (squared loss gradients at every targeted output, summed by
   :meth:`output_fisher`), only when that is set;
3. :meth:`allocate` -- the registered strategy over the free matrices, overrides outside it;
4. :meth:`truncate` -- every matrix factorized and swapped; on any failure every swapped
   layer is put back before the error propagates;
5. :meth:`quantize` -- rotations, β, fake quantization (``recipe.quantization``);
6. :meth:`finish` -- the report and the plan, built once from what the stages did.

:func:`compression.compress_` runs them all; the Lightning callbacks run one each (they gather
batches, reduce across processes and log).  ``family`` is the model family's spec (duck-typed:
``default_targets``, ``joint_groups``, ``quant_exclude``, ``calibration_forward``,
``training_loss``); every hook is optional.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compression.allocation import (
    ALLOCATORS,
    AllocationInputs,
    AllocationResult,
    Matrix,
    run_allocation,
    token_cost_weights,
)
from compression.collector import collect_stats, default_forward
from compression.joint import decompose_joint, install_joint, joint_num_parameters, restore_joint_
from compression.lowrank import LowRankLinear, linear_num_parameters
from compression.matrices import build_matrices, fixed_by_overrides
from compression.methods import build_method
from compression.parallel import ordered_map
from compression.plan import make_plan, set_submodule
from compression.recipe import Recipe
from compression.report import CompressionReport, LayerReport
from compression.stats import STAT_FIELDS, ActivationStats
from compression.targets import select_targets

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Any]]
"""A function returning a fresh iterable of calibration batches (already on the model's device)."""

STAGES = ("statistics", "importance", "allocate", "truncate", "quantize", "finish")
STAGE_ORDER = {stage: i for i, stage in enumerate(STAGES)} | {"fisher": STAGES.index("statistics")}
"""Each stage's place; the output Fisher weights share the statistics' (either may come first: the
sequential mode needs the weights for its spectra pass, before its statistics)."""


class CompressionPipeline:
    """See the module docstring.  Attributes filled by the stages: ``stats``, ``importances``,
    ``allocation``, ``report``, ``quantization``, ``rotation``, ``plan``."""

    def __init__(self, model: nn.Module, recipe: Recipe, family: Any = None) -> None:
        if not isinstance(recipe, Recipe):
            raise TypeError(f"compress_ takes a compression.Recipe, got {type(recipe).__name__}")
        self.model, self.recipe, self.family = model, recipe, family
        self.start = time.perf_counter()
        self.done: list[str] = []
        self.stats: ActivationStats | None = None
        self.importances: dict[str, torch.Tensor] | None = None
        self.allocation: AllocationResult | None = None
        self.report: CompressionReport | None = None
        self.quantization: dict | None = None
        self.rotation: dict | None = None
        self.plan: dict | None = None
        self.params_before = sum(p.numel() for p in model.parameters())
        self.method = build_method(recipe.method, **recipe.method_args) if recipe.lowrank else None
        self.names: list[str] = []
        self.skipped: dict[str, str] = {}
        self.matrices: dict[str, Matrix] = {}
        self.fixed: dict[str, dict[str, float]] = {}
        self.known_spectra: dict[str, torch.Tensor] = {}  # sequential mode: spectra kept from a first pass
        self.output_fisher_sums: dict[str, torch.Tensor] | None = None  # calibration.output_fisher
        self.sequential = False
        self._check_layout()
        if self.method is not None:
            self._select()

    def _check_layout(self) -> None:
        """Refuse a rotation (or rotated weight quantization) the model's layout cannot take, before any stage."""
        q = self.recipe.quantization
        layout_of = getattr(self.family, "layout", None)
        if not q.rotate or layout_of is None:
            return
        layout = layout_of(self.model)
        if layout is None:
            return
        layout.require("rotation")
        if q.weight_bits is not None:
            layout.require("rotated_weight_quantization")

    # -- selection ----------------------------------------------------------------------------------
    def _hook(self, name: str) -> Callable | None:
        return getattr(self.family, name, None) if self.family is not None else None

    def _select(self) -> None:
        recipe, model = self.recipe, self.model
        targets = recipe.targets
        if targets is None and self._hook("default_targets") is not None:
            targets = self.family.default_targets(model)
        selection = select_targets(model, targets, recipe.exclude)
        self.names, self.skipped = selection.names, dict(selection.skipped)
        self.matrices = build_matrices(model, self.names, recipe.joint_qkv, self._hook("joint_groups"))
        self.fixed = fixed_by_overrides(self.matrices, recipe.overrides)
        allocator = ALLOCATORS[recipe.allocation]
        if allocator.global_budget and self.fixed and recipe.overrides:
            log.info("%d matrices fixed by overrides; %s allocates the others under their own budget",
                     len(self.fixed), recipe.allocation)

    # -- what the data stages need --------------------------------------------------------------------
    @property
    def stat_needs(self) -> frozenset[str]:
        """Statistics fields the recipe needs: ``gram`` / ``abs`` (method), ``count`` (FLOPs budget)."""
        if self.method is None:
            return frozenset()
        needs = set(self.method.needs)
        if self.recipe.budget == "flops":
            needs.add("count")
        return frozenset(needs)

    @property
    def needs_importance(self) -> bool:
        return self.method is not None and "importance" in ALLOCATORS[self.recipe.allocation].needs

    @property
    def needs_fisher(self) -> bool:
        return self.method is not None and self.recipe.calibration.output_fisher is not None

    def _require_fisher(self, stage: str) -> None:
        if self.needs_fisher and "fisher" not in self.done:
            raise RuntimeError(f"calibration.output_fisher is set: run the output Fisher stage (set_output_fisher) "
                               f"before {stage}")

    @property
    def needs_batches(self) -> bool:
        """Whether :meth:`quantize` reads calibration batches (β search, GPTQ Grams)."""
        q = self.recipe.quantization
        return q.enabled and (q.beta_search or (q.weight_bits is not None and q.weight_method == "gptq"))

    def _advance(self, stage: str) -> None:
        if stage in self.done:
            raise RuntimeError(f"compression stage {stage!r} already ran")
        later = [s for s in self.done if STAGE_ORDER[s] > STAGE_ORDER[stage]]
        if later:
            raise RuntimeError(f"compression stage {stage!r} must run before {later}")
        self.done.append(stage)

    # -- 1. statistics ------------------------------------------------------------------------------
    def collect(self, batches: Iterable[Any], forward: Callable | None = None) -> ActivationStats:
        """Calibration statistics of every targeted layer (one accumulator per distinct input)."""
        forward = forward or self._hook("calibration_forward") or default_forward
        stats = collect_stats(self.model, self.names, batches, forward=forward,
                              needs=self.stat_needs & STAT_FIELDS, device=self.recipe.calibration.stats_device)
        self.set_statistics(stats)
        return stats

    def set_statistics(self, stats: ActivationStats | None) -> None:
        self._advance("statistics")
        if self.stat_needs:
            if stats is None:
                raise ValueError(f"method {self.recipe.method!r} (budget {self.recipe.budget}) needs calibration "
                                 "statistics; none were given")
            for name in self.names:
                self.method.check_stats(stats[name] if name in stats else None, name)
        self.stats = stats

    def defer_statistics(self, spectra: dict[str, torch.Tensor] | None = None,
                         counts: ActivationStats | None = None) -> None:
        """Block-sequential mode (:mod:`compression.sequential`): statistics arrive block by block in
        :meth:`truncate_block`.  ``spectra`` (matrix key -> singular values) and ``counts`` (token counts
        only) are what a first pass kept for an allocation that needs global information."""
        self._advance("statistics")
        self.sequential = True
        self.known_spectra = dict(spectra or {})
        self.stats = counts

    # -- 2. output Fisher, importance ---------------------------------------------------------------
    def output_fisher(self, batches: Iterable[Any], loss: Callable | None = None) -> dict[str, torch.Tensor]:
        """Every targeted layer's summed squared loss gradient at its output over ``batches`` (this process's
        share: sum across processes before :meth:`set_output_fisher`); reads the model, changes nothing."""
        from compression.output_fisher import output_fisher

        loss = loss or self._hook("training_loss")
        if loss is None:
            raise ValueError("calibration.output_fisher needs a loss: give the family's training_loss")
        batches = list(batches)
        full = self.recipe.calibration.output_fisher_full
        if not batches:  # a DDP rank without a share still joins the sum: it adds zeros
            return {n: torch.zeros((self.model.get_submodule(n).out_features,) * (2 if full else 1),
                                   dtype=torch.float64) for n in self.names}
        was_training = self.model.training
        self.model.eval()
        try:
            return output_fisher(self.model, self.names, batches, loss, full=full)[0]
        finally:
            self.model.train(was_training)

    def set_output_fisher(self, fisher: dict[str, torch.Tensor]) -> None:
        """Weight the method's truncation by these sums (:class:`compression.output_fisher.OutputWeighted`,
        damping ``calibration.output_fisher``); a joint group's members are stacked in member order."""
        from compression.output_fisher import OutputWeighted

        if not self.needs_fisher:
            raise ValueError("set_output_fisher: calibration.output_fisher is not set in the recipe")
        missing = sorted({n for m in self.matrices.values() for n in m.members} - set(fisher))
        if missing:
            raise ValueError(f"output Fisher missing for {len(missing)} targeted layers, e.g. {missing[:3]}")
        full = self.recipe.calibration.output_fisher_full  # full: a joint group's Fisher is block-diagonal
        per_key = {}
        for key, matrix in self.matrices.items():
            parts = [fisher[n].double().cpu() for n in matrix.members]
            per_key[key] = torch.block_diag(*parts) if full else torch.cat(parts)
        self._advance("fisher")
        self.method = OutputWeighted(self.method, per_key, self.recipe.calibration.output_fisher)
        self.output_fisher_sums = {n: fisher[n] for n in self.names}

    def importance(self, batches: Iterable[Any], loss: Callable | None = None) -> dict[str, torch.Tensor]:
        """QSVD importance of every singular triplet of every matrix from these batches' gradients
        (this process's share only: sum across processes before :meth:`allocate`)."""
        from compression.gradient_allocation import gradient_importance

        self._require_fisher("the gradient importance")
        self._advance("importance")
        loss = loss or self._hook("training_loss")
        if loss is None:
            raise ValueError("gradient allocation needs a loss: give the family's training_loss")
        batches = list(batches)
        if not batches:  # a DDP rank without a share still joins the sum: it adds zeros
            self.importances = {k: torch.zeros(min(m.shape), dtype=torch.float64) for k, m in self.matrices.items()}
            return self.importances
        was_training = self.model.training
        self.model.eval()  # no dropout: the importance is of the deterministic function
        try:
            self.importances = gradient_importance(self.model, {k: list(m.members) for k, m in self.matrices.items()},
                                                   batches, loss, self.method, self.stats, self.recipe.device)
        finally:
            self.model.train(was_training)
        return self.importances

    # -- 3. allocate --------------------------------------------------------------------------------
    def _stats_for(self, name: str):
        return self.stats[name] if self.stats is not None and name in self.stats else None

    def _weight(self, matrix: Matrix) -> torch.Tensor:
        w = torch.cat([self.model.get_submodule(n).weight.detach() for n in matrix.members], 0)
        return w.to(self.recipe.device) if self.recipe.device else w

    @torch.no_grad()
    def spectrum(self, key: str) -> torch.Tensor:
        """Singular values of matrix ``key`` in the method's space (float64, CPU)."""
        if key in self.known_spectra:
            return self.known_spectra[key]
        matrix = self.matrices[key]
        return self.method.spectrum(self._weight(matrix), self._stats_for(matrix.members[0]), key).cpu()

    def allocate(self, importances: dict[str, torch.Tensor] | None = None) -> AllocationResult:
        """Every matrix's rank: overrides first (exact), the strategy over the rest."""
        if "statistics" not in self.done:
            self.set_statistics(None)
        self._require_fisher("the allocation")
        self._advance("allocate")
        recipe = self.recipe
        if importances is not None:
            self.importances = importances
        if self.needs_importance and self.importances is None:
            raise ValueError("allocation 'gradient' needs gradient importances: run the importance stage first")
        free = {k: m for k, m in self.matrices.items() if k not in self.fixed}
        cost = None
        if recipe.budget == "flops":
            tokens = token_cost_weights(self.stats, [m.members[0] for m in self.matrices.values()])
            cost = {k: tokens[m.members[0]] for k, m in free.items()}
        result = AllocationResult({})
        if free:
            from compression.output_fisher import OutputWeighted

            scales = self.method.scales if isinstance(self.method, OutputWeighted) else None
            inputs = AllocationInputs(free, recipe.ratio, recipe.max_ratio, recipe.min_rank, cost, self.spectrum,
                                      self.importances, recipe.components, loss_scale=scales)
            result = run_allocation(recipe.allocation, inputs, dense_above_break_even=recipe.dense_above_break_even)
        for key, spec in self.fixed.items():
            matrix = self.matrices[key]
            if "rank" in spec:
                rank = int(spec["rank"])
                if rank > min(matrix.shape):
                    raise ValueError(f"overrides: rank {rank} for {key!r} exceeds min{matrix.shape} = "
                                     f"{min(matrix.shape)}")
                result.ranks[key] = rank
            else:
                result.ranks[key] = matrix.rank_for_ratio(float(spec["ratio"]))
                result.ratios[key] = float(spec["ratio"])
        for key in result.dense:
            self.skipped[key] = f"kept dense: {recipe.allocation} gave it a rank at or above its break-even"
        self.allocation = result
        ranks = [r for k, r in result.ranks.items() if k not in result.dense]
        if ranks:
            log.info("%s allocation: ranks %d..%d over %d matrices (%d kept dense)%s", recipe.allocation,
                     min(ranks), max(ranks), len(ranks), len(result.dense),
                     f"; {result.note}" if result.note else "")
        return result

    # -- 4. truncate --------------------------------------------------------------------------------
    @torch.no_grad()
    def truncate(self) -> list[LayerReport]:
        """Factorize and swap every allocated matrix; all or nothing."""
        if "allocate" not in self.done:
            raise RuntimeError("truncate needs ranks: run allocate first")
        self._advance("truncate")
        singles: list[tuple[str, nn.Module]] = []
        groups: dict[str, dict[str, nn.Module]] = {}
        self.layer_reports: list[LayerReport] = []
        self.plan_layers: dict[str, dict] = {}
        self.plan_groups: dict[str, dict] = {}
        try:
            self._swap(list(self.matrices), singles, groups)
        except BaseException:
            for name, layer in reversed(singles):
                set_submodule(self.model, name, layer)
            restore_joint_(self.model, groups)
            log.error("compression failed; %d layers and %d joint groups restored", len(singles), len(groups))
            raise
        return self.layer_reports

    @torch.no_grad()
    def truncate_block(self, keys: list[str], stats: ActivationStats | None) -> list[LayerReport]:
        """Sequential mode: factorize the matrices ``keys`` (one block's) with that block's statistics,
        at the ranks :meth:`allocate` decided.  On any failure every layer swapped so far, in this block
        and the earlier ones, is put back before the error propagates (the originals are kept, see
        :meth:`originals`)."""
        if not self.sequential:
            raise RuntimeError("truncate_block is the sequential mode's truncation: call defer_statistics first")
        if "allocate" not in self.done:
            raise RuntimeError("truncate_block needs ranks: run allocate first")
        if "truncate" not in self.done:
            self._advance("truncate")
            self.layer_reports, self.plan_layers, self.plan_groups = [], {}, {}
            self._singles: list[tuple[str, nn.Module]] = []
            self._groups: dict[str, dict[str, nn.Module]] = {}
        if self.stat_needs & STAT_FIELDS:
            for key in keys:
                for name in self.matrices[key].members:
                    self.method.check_stats(stats[name] if stats is not None and name in stats else None, name)
        counts, self.stats = self.stats, stats
        start = len(self.layer_reports)
        try:
            self._swap(keys, self._singles, self._groups)
            if self.recipe.calibration.correct_dense:
                self._correct_dense(keys)
        except BaseException:
            self.restore_swapped()
            raise
        finally:
            self.stats = counts
        return self.layer_reports[start:]

    def restore_swapped(self) -> None:
        """Sequential mode: put back every layer :meth:`truncate_block` swapped (a run that failed)."""
        singles, groups = getattr(self, "_singles", []), getattr(self, "_groups", {})
        for name, layer in reversed(singles):
            set_submodule(self.model, name, layer)
        for layer, weight in reversed(getattr(self, "_corrected", [])):
            layer.weight.copy_(weight)
        self._corrected = []
        restore_joint_(self.model, groups)
        if singles or groups:
            log.error("sequential compression failed; %d layers and %d joint groups restored", len(singles),
                      len(groups))
        self._singles, self._groups = [], {}

    @torch.no_grad()
    def _correct_dense(self, keys: list[str]) -> None:
        """``calibration.correct_dense``: each kept-dense matrix among ``keys`` (every member of a kept-dense
        joint group) takes the method's full-rank dense-target optimum; the old weights are kept to undo."""
        self._corrected = getattr(self, "_corrected", [])
        for key in keys:
            if key not in self.allocation.dense:
                continue
            stats = self._stats_for(self.matrices[key].members[0])
            for name in self.matrices[key].members:
                layer = self.model.get_submodule(name)
                weight = layer.weight.detach()
                new = self.method.corrected(weight.to(self.recipe.device) if self.recipe.device else weight, stats,
                                            name)
                self._corrected.append((layer, weight.clone()))
                layer.weight.copy_(new.to(weight.device, weight.dtype))
            self.skipped[key] += "; corrected towards the dense targets (calibration.correct_dense)"

    def drop_originals(self) -> None:
        """Sequential mode with streamed weights: forget the swapped-out dense layers (they are on disk)."""
        self._singles, self._groups = [], {}

    def originals(self) -> list[nn.Module]:
        """Sequential mode: the dense layers swapped out so far (kept to undo a failed run)."""
        return [m for _, m in getattr(self, "_singles", [])] + [m for g in getattr(self, "_groups", {}).values()
                                                               for m in g.values()]

    def _assigned(self, matrix: Matrix) -> float:
        rank = self.allocation.ranks[matrix.key]
        return self.allocation.ratios.get(matrix.key, matrix.ratio_at(rank))

    def _swap(self, keys: list[str], singles: list[tuple[str, nn.Module]],
              groups: dict[str, dict[str, nn.Module]]) -> None:
        """Factorize the allocated matrices among ``keys`` (``recipe.decompose_threads`` at a time,
        :mod:`compression.parallel`) and swap each in, in order, as its factors arrive; every swapped-out
        original goes to ``singles`` / ``groups`` (to put back if a later one fails)."""
        work = [k for k in keys if k not in self.allocation.dense]
        inputs = ((key, self._inputs(key)) for key in work)  # read in this thread, a bounded few at a time
        with ordered_map(self._factor, inputs, self.recipe.decompose_threads) as results:
            for key, factors in zip(work, results):
                matrix = self.matrices[key]
                if matrix.joint:
                    groups[key] = {n: self.model.get_submodule(n) for n in matrix.members}
                    self._install_joint(matrix, factors)
                else:
                    layer = self.model.get_submodule(key)
                    singles.append((key, layer))
                    self._install_single(matrix, layer, factors)

    def _inputs(self, key: str) -> tuple:
        """What decomposing matrix ``key`` reads: weight(s) and statistics (nothing else of the model)."""
        matrix = self.matrices[key]
        if not matrix.joint:
            return self._weight(matrix), self._stats_for(key)
        weights = [self.model.get_submodule(n).weight.detach().double() for n in matrix.members]
        if self.recipe.device:
            weights = [w.to(self.recipe.device) for w in weights]
        stats = self._stats_for(matrix.members[0])
        if stats is not None and any(self.stats.owner.get(n) != self.stats.owner.get(matrix.members[0])
                                     for n in matrix.members):
            log.warning("group %r: q/k/v statistics are not one shared stream; using %r's", key, matrix.members[0])
        return weights, stats

    def _factor(self, item: tuple[str, tuple]):
        """The factors of one matrix at its allocated rank (touches no module: runs in a worker thread)."""
        key, (weight, stats) = item
        rank = self.allocation.ranks[key]
        if self.matrices[key].joint:
            return decompose_joint(self.method, weight, stats, key, rank, self.allocation.components.get(key))
        return self.method.decompose(weight, stats, rank, key)

    def _install_single(self, matrix: Matrix, layer: nn.Linear, factors) -> None:
        name = matrix.key
        rank = factors.up.shape[1]
        new = LowRankLinear.from_linear(layer, rank, factors.up, factors.down)
        set_submodule(self.model, name, new)
        self.plan_layers[name] = {"rank": rank, "in_features": layer.in_features, "out_features": layer.out_features,
                                  "bias": layer.bias is not None}
        self.layer_reports.append(LayerReport(
            name=name, out_features=layer.out_features, in_features=layer.in_features, rank=rank,
            params_before=linear_num_parameters(layer), params_after=new.num_parameters(),
            ratio_assigned=self._assigned(matrix), truncation_loss=factors.truncation_loss,
            relative_loss=factors.relative_loss))

    def _install_joint(self, matrix: Matrix, f) -> None:
        key, model = matrix.key, self.model
        layers = [model.get_submodule(n) for n in matrix.members]
        rank = f.down.shape[0]
        short = [n.rsplit(".", 1)[-1] for n in matrix.members]
        install_joint(model.get_submodule(key), short, f.ups, f.down, rank)
        self.plan_groups[key] = {"members": short, "rank": rank, "in_features": matrix.in_features,
                                 "out_features": list(matrix.out_sizes),
                                 "bias": [lin.bias is not None for lin in layers]}
        total = f.total_energy
        self.layer_reports.append(LayerReport(
            name=f"{key}.qkv", out_features=matrix.shape[0], in_features=matrix.in_features, rank=rank,
            params_before=sum(linear_num_parameters(lin) for lin in layers),
            params_after=joint_num_parameters(model.get_submodule(key), short),
            ratio_assigned=self._assigned(matrix), truncation_loss=f.truncation_loss,
            relative_loss=(f.truncation_loss**2 / total) ** 0.5 if total > 0 else 0.0))

    # -- 5. quantize --------------------------------------------------------------------------------
    def quantize(self, batches: Batches | None = None) -> dict | None:
        """Rotations, β and fake quantization (:mod:`compression.quantize_stage`)."""
        from compression.quantize_stage import run_quantization

        if self.method is not None and "truncate" not in self.done:
            raise RuntimeError("quantize runs after truncate (the low-rank pairs must exist)")
        if self.sequential:
            raise ValueError("calibration.mode: sequential does not run the quantization stage; quantize the "
                             "compressed model in a second run")
        self._advance("quantize")
        if self.needs_batches and batches is None:
            raise ValueError("this quantization recipe (β search or GPTQ) needs calibration batches")
        beta_from = float(self.method.config.beta) if self.method is not None else 0.5
        self.rotation, self.quantization = run_quantization(self.model, self.recipe.quantization, self.family,
                                                            batches, beta_from)
        return self.quantization

    # -- 6. finish ----------------------------------------------------------------------------------
    def finish(self) -> CompressionReport:
        """The report and the plan (method, ranks, joint groups, rotation, quantization, the recipe)."""
        self._advance("finish")
        recipe = self.recipe
        method = self.method.config.to_dict() if self.method is not None else {"name": "none"}
        layers = getattr(self, "plan_layers", {})
        groups = getattr(self, "plan_groups", {})
        self.plan = make_plan(method, recipe.ratio if self.method is not None else 0.0,
                              recipe.allocation if self.method is not None else "none", layers,
                              joint_groups=groups, quantization=self.quantization, rotation=self.rotation,
                              forms=getattr(self.family, "forms", None))
        self.plan["recipe"] = recipe.to_dict()
        name = self.method.name if self.method is not None else "none"
        self.report = CompressionReport(
            method=f"joint_{name}" if groups and not layers else name, allocation=self.plan["allocation"],
            ratio=self.plan["ratio"], layers=getattr(self, "layer_reports", []),
            model_params_before=self.params_before,
            model_params_after=sum(p.numel() for p in self.model.parameters()),
            plan=self.plan, skipped=self.skipped, seconds=time.perf_counter() - self.start,
            blocks=list(getattr(self, "block_records", [])))
        if self.report.layers:
            log.info("%s", self.report.to_table(max_rows=0))
        return self.report
