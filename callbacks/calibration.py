"""Whitening collection: run the calibration loader through the model with statistics hooks.

Collects, for every layer the recipe targets, what its method and budget need (the float64 Gram
``XᵀX`` for the whitening methods, per-channel abs-mean/abs-max for ASVD, token counts for a
FLOPs budget; :mod:`compression.stats`), one accumulator per distinct input tensor.  Under DDP
every rank sees its own calibration shard and the accumulators are summed (max for abs-max)
across ranks, so the result equals a single process over all the data.
"""

from __future__ import annotations

import logging
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm

from callbacks.state import CompressionStage, all_reduce_fn, calibration_loader, pipeline_of
from compression import StatsCollector
from compression.stats import STAT_FIELDS

log = logging.getLogger(__name__)


class WhiteningCollection(CompressionStage, Callback):
    """Collect calibration statistics (``recipe.calibration``: ``max_batches``, ``stats_device``, ``progress``)."""

    name = "calibration"

    @torch.no_grad()
    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = pipeline_of(pl_module)
        settings = pipe.recipe.calibration
        if not pipe.stat_needs:
            pipe.set_statistics(None)
            return
        loader = calibration_loader(trainer, "calibration")
        total = len(loader) if hasattr(loader, "__len__") else None
        if settings.max_batches is not None and total is not None:
            total = min(total, settings.max_batches)
        rank, world = trainer.global_rank, trainer.world_size
        if world > 1 and total is not None:
            if total < world:
                raise ValueError(f"{total} calibration batches cannot be shared by {world} processes; "
                                 "use more calibration samples or a smaller batch size")
            total = len(range(rank, total, world))
        start = time.perf_counter()
        model = pl_module.model
        was_training = model.training
        model.eval()
        bar = tqdm(total=total, desc="calibration", disable=not (settings.progress and trainer.is_global_zero))
        # stop_early: each forward ends once the targeted layers have run (before an LM head: nothing after it
        # is needed), the same collection compress_ and benchmarks/compression_cost.py time
        with StatsCollector(model, pipe.names, needs=pipe.stat_needs & STAT_FIELDS,
                            device=settings.stats_device, stop_early=True) as collector:
            for i, batch in enumerate(loader):
                if settings.max_batches is not None and i >= settings.max_batches:
                    break
                if i % world != rank:
                    continue
                collector.run(model, trainer.strategy.batch_to_device(batch), pl_module.spec.calibration_forward)
                bar.update(1)
        bar.close()
        model.train(was_training)
        stats = collector.stats.reduce_(all_reduce_fn(trainer))
        pipe.set_statistics(stats)
        pl_module.calibration_seconds = time.perf_counter() - start
        log.info("calibration: %d layers, %d input streams, %d tokens, %.1f MiB, %.1f s", len(stats.owner),
                 len(stats.streams), next(iter(stats.streams.values())).count, stats.nbytes() / 2**20,
                 pl_module.calibration_seconds)
