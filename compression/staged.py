"""Staged ("true-sequential") calibration inside a block: ``calibration.staged`` of the sequential mode.

The sequential driver (:mod:`compression.sequential`) takes a block's statistics in one pass with the
block still dense, so a layer that reads the output of other targeted layers of the same block is
whitened on what those layers produce *before* they are compressed: in a LLaMA block ``o_proj`` sees
the attention output of dense q/k/v and ``down_proj`` the MLP hidden of dense gate/up, while at
inference both see the compressed ones.  Staging (GPTQ's ``true-sequential`` option) fixes the order:

1. *groups* -- one forward of the dense block on the first calibration batch records, for every
   targeted layer, the order of its call and the tensor object it reads; layers reading the same
   tensor form one group (q/k/v; gate/up), groups ordered by their first call.  A group's input exists
   when its first member runs, so it depends only on layers called before it: the order is derived,
   no layer names are assumed.  Refused: a targeted layer not reached by that forward, one called more
   than once (its inputs cannot be given one place in the order), a joint matrix (q/k/v with one basis)
   whose members read different tensors;
2. *stages* -- a group joins the stage before it when factorizing that stage changes nothing (every
   matrix kept dense by ``dense_above_break_even``, without ``correct_dense``: the group's inputs are the
   same either way) or when the group itself changes nothing (its statistics are only checked, not used);
3. for each stage ``s``: run the block -- its stages ``< s`` already factorized -- on every calibration
   batch with statistics hooks on the stage's layers (stages after the first end each forward after
   the stage's last layer), reduce, factorize the stage's matrices at the allocated ranks.

Stage 0 runs the whole dense block (its output is the dense output ``D_l`` the block's error is measured
against), later stages a prefix of it.  Cost for a LLaMA block with every group factorized: four block
forwards per batch instead of one (the prefix up to q/k/v, the whole block, the block up to ``gate/up``
and up to ``down_proj``), and the Grams are the same size.

Dense targets (``calibration.dense_targets``): ``X_d`` of a layer is its input in the fully dense model
(the dense stream run through the dense block, as without staging), ``X_c`` its input through the
compressed blocks before it and the already-compressed stages of its own block.  The dense stream runs
once per batch in stage 0 (the block is still dense then); the inputs of later stages' layers are kept
in the activation store (``calibration.activations``) until their stage has run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from compression.block_capture import BlockForward, LayerInputs, group_by_input, layer_calls, run_block
from compression.collector import StatsCollector
from compression.stats import CROSS, STAT_FIELDS


@dataclass
class Stage:
    """Matrix ``keys`` factorized together after statistics on the layers ``names`` (``groups``: their inputs)."""

    keys: list[str] = field(default_factory=list)
    groups: list[list[str]] = field(default_factory=list)

    @property
    def names(self) -> list[str]:
        return [n for g in self.groups for n in g]


def input_groups(block: nn.Module, names: Mapping[str, str], forward: Callable[[nn.Module], Any]) -> list[list[str]]:
    """Targeted layers grouped by the tensor they read, groups in the order of their first call.

    ``names``: module path inside ``block`` -> the layer's name in the model; ``forward(block)`` runs
    the block once.  Layers not reached, or reached more than once, are refused (ValueError)."""
    calls = layer_calls(block, names, forward)
    seen = [n for n, _ in calls]
    twice = sorted({n for n in seen if seen.count(n) > 1})
    if twice:
        raise ValueError(f"calibration.staged: {twice[:3]} run more than once in one forward of the block, so their "
                         "inputs have no single place in the block's order; set calibration.staged: false")
    missing = [n for n in names.values() if n not in seen]
    if missing:
        raise ValueError(f"calibration.staged: {missing[:3]} were not reached by a forward of the block, so their "
                         "inputs cannot be ordered; set calibration.staged: false or exclude them")
    return group_by_input(calls)  # identity, as the statistics share accumulators


def plan_stages(groups: Sequence[list[str]], members: Mapping[str, Sequence[str]],
                changes: Callable[[str], bool]) -> list[Stage]:
    """Stages from the ordered input groups: ``members[key]`` are matrix ``key``'s layers; ``changes(key)``
    says whether factorizing ``key`` alters its layers (not for a matrix kept dense and left as it is).
    A new stage starts only where a changing group follows a stage that changes."""
    group_of = {n: g for g, names in enumerate(groups) for n in names}
    keys_of: list[list[str]] = [[] for _ in groups]
    for key, layers in members.items():
        owners = {group_of[n] for n in layers}
        if len(owners) != 1:
            raise ValueError(f"calibration.staged: matrix {key!r} joins layers {list(layers)} that read different "
                             "tensors; set calibration.staged: false (or joint_qkv: false)")
        keys_of[owners.pop()].append(key)
    stages: list[Stage] = []
    for g, names in enumerate(groups):
        if not stages or (any(changes(k) for k in stages[-1].keys) and any(changes(k) for k in keys_of[g])):
            stages.append(Stage())
        stages[-1].keys += keys_of[g]
        stages[-1].groups.append(list(names))
    return stages


def staged_block(seq: Any, i: int, block: nn.Module, store: Any, extras: list) -> dict:
    """Statistics and factorization of block ``i`` stage by stage (module docstring), for
    :class:`compression.sequential.SequentialRun` (``seq``).  Leaves in ``store`` what the one-pass
    code leaves: ``("dense", b)`` (the dense block's outputs) and, with dense targets, ``("ref", b)``.
    Returns the block's record so far (``stats_bytes``: the largest stage's statistics)."""

    pipe, cal, device, model = seq.pipe, seq.recipe.calibration, seq.device, seq.model
    keys, path = seq.keys_of[i], seq.paths[i]
    names = [n for k in keys for n in pipe.matrices[k].members]
    groups = input_groups(block, {n[len(path) + 1:]: n for n in names},
                          lambda blk: run_block(blk, store.get(("in", 0), device), extras[0][i], device))
    changes = (lambda k: True) if cal.correct_dense else (lambda k: k not in pipe.allocation.dense)
    stages = plan_stages(groups, {k: pipe.matrices[k].members for k in keys}, changes)
    needs = (pipe.stat_needs & STAT_FIELDS) | ({CROSS} if cal.dense_targets else set())
    record = {"matrices": len(keys), "stats_bytes": 0, "output_error": 0.0, "update_error": 0.0, "layers": 0,
              "stages": len(stages)}
    for s, stage in enumerate(stages):
        collector = StatsCollector(model, stage.names, needs=needs, device=cal.stats_device, stop_early=s > 0)
        for b in range(len(extras)):
            if cal.dense_targets:  # before the hooks: the dense stream's forward is not the one calibrated on
                collector.reference = _dense_inputs(seq, i, b, block, store, extras, names, stages, s)
            out: list[torch.Tensor] = []
            with collector:
                collector.run(block, None, BlockForward(store.get(("in", b), device), extras[b][i], device, out))
            collector.reference = None
            if s == 0:  # the whole dense block ran: its output is what the block's error is measured against
                store.put(("dense", b), out.pop())
            for g in stage.groups if s > 0 and cal.dense_targets else ():
                store.drop(("xd", g[0], b))
        stats = collector.stats
        if seq.reduce is not None:
            stats.reduce_(seq.reduce)
        if cal.dense_targets and cal.target_alpha != 1.0:  # target X_c + α (X_d - X_c)
            for stream in stats.streams.values():
                stream.cross.mul_(cal.target_alpha)
        record["stats_bytes"] = max(record["stats_bytes"], stats.nbytes())
        seq._notify("stats", {"block": i, "stage": s, "stats": stats})
        record["layers"] += len(pipe.truncate_block(stage.keys, stats))
        del stats, collector
    return record


def _dense_inputs(seq: Any, i: int, b: int, block: nn.Module, store: Any, extras: list, names: list[str],
                  stages: list[Stage], s: int) -> dict[str, torch.Tensor]:
    """Stage ``s``'s layers' inputs in the dense model for batch ``b``.  In stage 0 (the block still dense)
    the dense stream runs: its output is the next block's dense input; the later stages' inputs are kept
    (one per shared tensor, under its group's first layer)."""

    device = seq.device
    if s > 0:
        return {n: store.get(("xd", g[0], b), device) for g in stages[s].groups for n in g}
    with LayerInputs(seq.model, names) as seen:
        store.put(("ref", b), run_block(block, seq._reference(store, b), extras[b][i], device))
    for stage in stages[1:]:
        for g in stage.groups:
            store.put(("xd", g[0], b), seen.inputs[g[0]])
    return seen.inputs
