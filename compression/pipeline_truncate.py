"""Stage 4 of :class:`~compression.pipeline.CompressionPipeline`: factorize every allocated matrix and swap it in.

A plain matrix ``W`` (out x in) at its allocated rank ``r`` becomes ``W ≈ U V`` (``U``: out x r, ``V``: r x in,
the method's ``decompose``) in a :class:`~compression.lowrank.LowRankLinear`; a joint q/k/v group, its members
stacked (sum of outs x in), becomes one shared down projection ``V`` and one ``U_i`` per member
(:mod:`compression.joint`).  The matrices are decomposed ``recipe.decompose_threads`` at a time
(:mod:`compression.parallel`) and swapped in order as their factors arrive, every replaced layer kept:

- :meth:`~TruncateStage.truncate` -- all matrices at once; on any failure every swapped layer is put back;
- :meth:`~TruncateStage.truncate_block` -- the sequential mode (:mod:`compression.sequential`): one block's
  matrices with that block's statistics; the originals of every block so far stay kept
  (:meth:`~TruncateStage.originals`) so that :meth:`~TruncateStage.restore_swapped` undoes a failed run, and
  ``calibration.correct_dense`` gives the matrices kept dense their dense-target optimum.

:class:`TruncateStage` is a mixin of :class:`~compression.pipeline.CompressionPipeline`: it reads the
pipeline's ``model``, ``recipe``, ``method``, ``matrices``, ``allocation``, ``stats``, ``skipped``, ``done``,
``sequential``, ``stat_needs``, ``_advance``, ``_weight`` and ``_stats_for``, and fills ``layer_reports``,
``plan_layers`` and ``plan_groups`` for :meth:`~compression.pipeline.CompressionPipeline.finish`.
"""

from __future__ import annotations

import logging

import torch
from torch import nn

from compression.allocation import Matrix
from compression.joint import decompose_joint, install_joint, joint_num_parameters, restore_joint_
from compression.lowrank import LowRankLinear, linear_num_parameters
from compression.parallel import ordered_map
from compression.plan import set_submodule
from compression.report import LayerReport
from compression.stats import STAT_FIELDS, ActivationStats, shared_reads

log = logging.getLogger(__name__)


class TruncateStage:
    """The truncation stage and the factor installation (see the module docstring)."""

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
            self.method.check_all_stats(stats, [name for key in keys for name in self.matrices[key].members])
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
        # layers reading one input stream (q/k/v, gate/up) share its whitening factor (compression.stats)
        readers = [s for s in (self._stats_for(self.matrices[k].members[0]) for k in work) if s is not None]
        with shared_reads(readers), ordered_map(self._factor, inputs, self.recipe.decompose_threads) as results:
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
        short = [n.removeprefix(key + ".") for n in matrix.members]  # paths below the group's module
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
