"""A compression report counts the matrices the allocation kept dense among the targets: with
``dense_above_break_even`` the asked ratio is a budget over every targeted matrix, so the fraction removed of
the factorized layers alone (``params_ratio``) overstates it and ``targets_ratio`` is the figure to compare."""

from __future__ import annotations

import copy

import pytest

from compression import Recipe, compress_
from compression.lowrank import linear_num_parameters
from lightning_modules.cli import format_summary
from lightning_modules.specs import CausalLMSpec
from tests.test_sequential import SEQ, _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("mode", ["all at once", "sequential"])
def test_kept_dense_matrices_count_among_the_targets(mode):
    model, batches = _llama(), _batches()
    targets = CausalLMSpec(model=model).default_targets(model)
    all_targets = sum(linear_num_parameters(model.get_submodule(n)) for n in targets)
    calibration = {"progress": False} if mode == "all at once" else SEQ
    compressed = copy.deepcopy(model)
    report = compress_(compressed, Recipe("svd_llm", ratio=0.2, allocation="gradient", dense_above_break_even=True,
                                          calibration=calibration),
                       family=CausalLMSpec(model=compressed), batches=batches)
    kept = [n for n, why in report.skipped.items() if why.startswith("kept dense")]
    assert report.kept_dense == kept
    assert kept and len(kept) + len(report.layers) == len(targets)
    assert report.kept_dense_params == sum(linear_num_parameters(compressed.get_submodule(n)) for n in kept) > 0
    assert report.targeted_params_before + report.kept_dense_params == all_targets
    removed = report.targeted_params_before - report.targeted_params_after
    assert report.targets_ratio == pytest.approx(removed / all_targets, rel=1e-12)
    assert report.params_ratio == pytest.approx(removed / report.targeted_params_before, rel=1e-12)
    assert report.targets_ratio < 0.2 < report.params_ratio  # the budget is over every target, never above it
    assert report.targets_ratio > 0.2 - 0.02  # and spent up to each matrix's rank rounding

    line = next(x for x in format_summary({"compression": report.summary(), "wall_seconds": 1.0}).splitlines()
                if x.startswith("parameters:"))
    assert f"targeted layers {all_targets:,} -> {all_targets - removed:,} ({report.targets_ratio:.2%} removed; " \
           f"{len(kept)} matrices kept dense, the factorized ones {report.targeted_params_before:,} -> " in line
