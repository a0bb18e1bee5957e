"""``compress_(model, recipe, stats)``: the single in-place entry point.

Runs a :class:`~compression.recipe.Recipe` on a model (:class:`~compression.pipeline.CompressionPipeline`,
every stage once, in order) and returns the report, whose ``plan`` rebuilds the structure anywhere::

    stats = collect_stats(model, names, calibration_batches)        # or let compress_ collect them
    report = compress_(model, Recipe("svd_llm", ratio=0.2, allocation="v2"), stats)

Order of work, chosen so that bad input never leaves a half-compressed model: targets, matrices,
overrides and weights are checked when the pipeline is built; statistics are checked for every
layer before any rank is decided; ranks are decided for every matrix before any is cut; if any
decomposition fails, every swapped layer is put back before the error propagates.

The U/V LoRA part of a recipe needs training and is run by the Lightning callback
(:class:`callbacks.UVLoRA`); ``compress_`` runs the low-rank and quantization parts.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from compression.allocation import ALLOCATORS, AllocationResult
from compression.batches import split_batch, spread_batches
from compression.pipeline import CompressionPipeline
from compression.recipe import Recipe
from compression.report import CompressionReport
from compression.stats import ActivationStats


def _batches(batches: Iterable[Any] | Callable[[], Iterable[Any]] | None) -> Callable[[], Iterable[Any]] | None:
    if batches is None or callable(batches):
        return batches
    items = list(batches)
    return lambda: iter(items)


def _spread(batches: Callable[[], Iterable[Any]], count: int | None) -> list[Any]:
    return list(spread_batches(list(batches()), count))


def _needs(recipe: Recipe) -> tuple[bool, bool]:
    """``(gradient importances, output Fisher sums)``: what the recipe takes from backward passes."""
    return (recipe.lowrank and "importance" in ALLOCATORS[recipe.allocation].needs,
            recipe.lowrank and recipe.calibration.output_fisher is not None)


def _check_signals(recipe: Recipe, importances: Mapping | None, fisher: Mapping | None) -> None:
    """Importances given without the Fisher sums their bases were weighted by are refused."""
    if importances is not None and fisher is None and _needs(recipe)[1]:
        raise ValueError("calibration.output_fisher: importances= were computed in the output-weighted bases; "
                         "pass the fisher= sums they were computed with (compression.api.dense_signals)")


def prepare(model: nn.Module, recipe: Recipe | None = None, stats: ActivationStats | None = None, *,
            family: Any = None, batches: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
            importances: Mapping[str, torch.Tensor] | None = None,
            fisher: Mapping[str, torch.Tensor] | None = None) -> CompressionPipeline:
    """A pipeline with statistics, output Fisher weights, importances and ranks decided; nothing cut yet."""
    recipe = recipe if recipe is not None else Recipe()
    pipe = CompressionPipeline(model, recipe, family)
    if pipe.method is None:
        return pipe
    source = _batches(batches)
    if stats is None and pipe.stat_needs:
        if source is None:
            raise ValueError(f"method {recipe.method!r} needs calibration statistics: pass stats= or batches=")
        limit = recipe.calibration.max_batches
        pipe.collect(_spread(source, limit) if limit else source())
    else:
        pipe.set_statistics(stats)
    _check_signals(recipe, importances, fisher)
    if pipe.needs_fisher:
        if fisher is None:
            if source is None:
                raise ValueError("calibration.output_fisher needs calibration batches (batches=) or fisher=")
            fisher = pipe.output_fisher(_spread(source, recipe.calibration.gradient_batches))
        pipe.set_output_fisher(dict(fisher))
    elif fisher is not None:
        raise ValueError("fisher= given, but the recipe's calibration.output_fisher is not set")
    if pipe.needs_importance and importances is None:
        if source is None:
            raise ValueError("allocation 'gradient' needs calibration batches (batches=) or importances=")
        samples = _spread(source, recipe.calibration.gradient_batches)
        if not samples:
            raise ValueError("allocation 'gradient': the calibration batches are empty")
        pipe.importance([s for b in samples for s in split_batch(b)] if recipe.calibration.per_sample else samples)
    pipe.allocate(dict(importances) if importances is not None else None)
    return pipe


@dataclass
class DenseSignals:
    """What a sequential run takes from the dense model before any block is cut: the gradient importances
    (``allocation: gradient``) and the output Fisher sums (``calibration.output_fisher``), each ``None`` when
    the recipe does not use it."""

    importances: dict[str, torch.Tensor] | None
    fisher: dict[str, torch.Tensor] | None


def dense_signals(model: nn.Module, recipe: Recipe, *, family: Any = None,
                  batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> DenseSignals:
    """:func:`dense_importances` when the allocation needs them, and the output Fisher sums of the dense model
    (its ``gradient_batches`` batches) when ``calibration.output_fisher`` is set; the importances are taken
    in the bases those sums weight, as the all-at-once path takes them."""
    source = _batches(batches)
    dense = recipe.all_at_once()
    needs_importance, needs_fisher = _needs(recipe)
    if needs_importance:
        pipe = prepare(model, dense, family=family, batches=source)
        pipe.stats = None
        return DenseSignals(pipe.importances, pipe.output_fisher_sums)
    if needs_fisher:
        pipe = CompressionPipeline(model, dense, family)
        return DenseSignals(None, pipe.output_fisher(_spread(source, recipe.calibration.gradient_batches)))
    return DenseSignals(None, None)


def dense_importances(model: nn.Module, recipe: Recipe, *, family: Any = None,
                      batches: Iterable[Any] | Callable[[], Iterable[Any]]) -> dict[str, torch.Tensor]:
    """The gradient importances ``allocation: gradient`` ranks by, computed on the dense ``model`` exactly as
    the all-at-once path computes them (its statistics from ``calibration.max_batches`` batches, then
    ``calibration.gradient_batches`` backward passes): a sequential run with the gradient allocation takes its
    ranks from these, so its ranks are the all-at-once ranks.  The statistics are freed before returning."""
    if not _needs(recipe)[0]:
        raise ValueError(f"allocation {recipe.allocation!r} ranks by no gradient importances")
    return dense_signals(model, recipe, family=family, batches=batches).importances


def allocate(model: nn.Module, recipe: Recipe | None = None, stats: ActivationStats | None = None, *,
             family: Any = None, batches: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
             importances: Mapping[str, torch.Tensor] | None = None,
             fisher: Mapping[str, torch.Tensor] | None = None) -> AllocationResult:
    """Decide every targeted matrix's rank without touching the model (see :func:`compress_`)."""
    return prepare(model, recipe, stats, family=family, batches=batches, importances=importances,
                   fisher=fisher).allocation


def compress_(model: nn.Module, recipe: Recipe | None = None, stats: ActivationStats | None = None, *,
              family: Any = None, batches: Iterable[Any] | Callable[[], Iterable[Any]] | None = None,
              importances: Mapping[str, torch.Tensor] | None = None,
              fisher: Mapping[str, torch.Tensor] | None = None) -> CompressionReport:
    """Run ``recipe`` (default: ``Recipe()``, svd_llm at ratio 0.2) on ``model`` in place; return the report.

    Args:
        stats: calibration statistics (:func:`compression.collect_stats`); collected from
            ``batches`` when omitted and the method needs them.
        family: the model family's spec (default targets, joint groups, quantization excludes,
            calibration forward, loss); optional.
        batches: calibration batches (an iterable, or a function returning a fresh one) for the
            stages that read data: statistics, gradient importance, β search, GPTQ.
        importances: precomputed gradient importances (``allocation: gradient``), e.g. summed over
            processes.
        fisher: precomputed output Fisher sums (``calibration.output_fisher``; layer name -> summed squared
            output gradient), e.g. summed over processes; required with ``importances=`` when that is set.
    On any error the model is left as it was.

    ``recipe.calibration.mode: sequential`` runs block by block (:mod:`compression.sequential`):
    statistics are collected from ``batches`` one block at a time, so ``stats=`` is refused.  With
    ``allocation: gradient`` and no ``importances=`` the ranks come first from :func:`dense_signals`
    (the whole dense model, as all-at-once; with ``calibration.output_fisher`` also its output Fisher), then the
    blocks are compressed at those ranks.
    """
    recipe = recipe if recipe is not None else Recipe()
    if recipe.calibration.sequential:
        from compression.sequential import compress_sequential_

        if stats is not None:
            raise ValueError("calibration.mode: sequential collects statistics one block at a time from batches=; "
                             "stats= applies to calibration.mode: all_at_once")
        source = _batches(batches)
        if source is None:
            raise ValueError("calibration.mode: sequential needs calibration batches (batches=)")
        needs_importance, needs_fisher = _needs(recipe)
        _check_signals(recipe, importances, fisher)
        if (needs_importance and importances is None) or (needs_fisher and fisher is None):
            signals = dense_signals(model, recipe, family=family, batches=source)
            importances, fisher = signals.importances, signals.fisher
        limit = recipe.calibration.max_batches
        return compress_sequential_(model, recipe, family=family,
                                    batches=_spread(source, limit) if limit else list(source()),
                                    importances=dict(importances) if importances is not None else None,
                                    fisher=dict(fisher) if fisher is not None else None)
    pipe = prepare(model, recipe, stats, family=family, batches=batches, importances=importances, fisher=fisher)
    if pipe.method is not None:
        pipe.truncate()
    if pipe.recipe.quantization.enabled:
        source = _batches(batches)
        limit = pipe.recipe.quantization.max_batches
        pipe.quantize((lambda: iter(_spread(source, limit))) if source is not None else None)
    return pipe.finish()
