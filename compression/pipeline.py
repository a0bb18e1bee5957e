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
   layer is put back before the error propagates (:mod:`compression.pipeline_truncate`, with the
   sequential mode's block-by-block :meth:`truncate_block`);
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
from compression.lowrank import linear_num_parameters
from compression.matrices import build_matrices, fixed_by_overrides
from compression.methods import build_method
from compression.output_fisher import OutputWeighted, output_fisher
from compression.pipeline_truncate import TruncateStage
from compression.plan import make_plan
from compression.recipe import Recipe
from compression.report import CompressionReport
from compression.stats import STAT_FIELDS, ActivationStats
from compression.targets import select_targets

log = logging.getLogger(__name__)

Batches = Callable[[], Iterable[Any]]
"""A function returning a fresh iterable of calibration batches (already on the model's device)."""

STAGES = ("statistics", "importance", "allocate", "truncate", "quantize", "finish")
STAGE_ORDER = {stage: i for i, stage in enumerate(STAGES)} | {"fisher": STAGES.index("statistics")}
"""Each stage's place; the output Fisher weights share the statistics' (either may come first: the
sequential mode needs the weights for its spectra pass, before its statistics)."""


class CompressionPipeline(TruncateStage):
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
            self.method.check_all_stats(stats, self.names)
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
        self.kept_dense_params = sum(linear_num_parameters(self.model.get_submodule(name))
                                     for key in result.dense for name in self.matrices[key].members)
        self.allocation = result
        ranks = [r for k, r in result.ranks.items() if k not in result.dense]
        if ranks:
            log.info("%s allocation: ranks %d..%d over %d matrices (%d kept dense)%s", recipe.allocation,
                     min(ranks), max(ranks), len(ranks), len(result.dense),
                     f"; {result.note}" if result.note else "")
        return result

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
            plan=self.plan, skipped=self.skipped, kept_dense_params=getattr(self, "kept_dense_params", 0),
            seconds=time.perf_counter() - self.start,
            blocks=list(getattr(self, "block_records", [])))
        if self.report.layers:
            log.info("%s", self.report.to_table(max_rows=0))
        return self.report
