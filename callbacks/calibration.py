"""Whitening collection: run the calibration loader through the model with statistics hooks.

Collects, for every layer the truncation callback will touch, the float64 Gram ``XᵀX``
(one per distinct input tensor), token count and per-channel abs-mean/abs-max
(:mod:`compression.stats`).  Under DDP every rank sees its own calibration shard and the
accumulators are summed (max for abs-max) across ranks, so the result equals a single
process over all the data.
"""

from __future__ import annotations

import logging
import time

import torch
import torch.distributed as dist
from lightning.pytorch import Callback, LightningModule, Trainer
from tqdm.auto import tqdm

from callbacks.state import already_compressed, find_callback, get_state
from compression import StatsCollector

log = logging.getLogger(__name__)


def all_reduce_fn(trainer: Trainer):
    """``fn(tensor, op)`` for :meth:`ActivationStats.reduce_`: identity on one process."""

    def fn(t: torch.Tensor, op: str) -> torch.Tensor:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    return fn


class WhiteningCollection(Callback):
    """Collect calibration statistics at the start of fit.

    Args:
        max_batches: stop after this many calibration batches (``None``: the whole loader).
        with_gram: collect the Gram matrix (needed by ``svd_llm``/``svd_llm_v2``; ``asvd`` and
            ``svd`` do not need it, which saves memory).
        stats_device: where accumulators live (``None``: each layer's device).
        progress: show a progress bar on rank zero.
    """

    def __init__(self, max_batches: int | None = None, with_gram: bool = True, stats_device: str | None = None,
                 progress: bool = True) -> None:
        self.max_batches = max_batches
        self.with_gram = with_gram
        self.stats_device = stats_device
        self.progress = progress

    @torch.no_grad()
    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if already_compressed(pl_module):
            log.info("model already compressed (plan restored); skipping calibration")
            return
        from callbacks.truncation import SVDTruncation

        truncation = find_callback(trainer, SVDTruncation, "WhiteningCollection")
        names = truncation.selected_layers(pl_module)
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise RuntimeError("WhiteningCollection needs a datamodule with a calibration_dataloader() method")
        loader = dm.calibration_dataloader()
        total = len(loader) if hasattr(loader, "__len__") else None
        if self.max_batches is not None and total is not None:
            total = min(total, self.max_batches)
        # Lightning shards only the loaders it manages; this one is sharded here, round-robin by batch,
        # so every batch is seen by exactly one rank (a DistributedSampler would pad with duplicates)
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
        bar = tqdm(total=total, desc="calibration", disable=not (self.progress and trainer.is_global_zero))
        with StatsCollector(model, names, with_gram=self.with_gram, device=self.stats_device) as collector:
            for i, batch in enumerate(loader):
                if self.max_batches is not None and i >= self.max_batches:
                    break
                if i % world != rank:
                    continue
                pl_module.spec.calibration_forward(model, trainer.strategy.batch_to_device(batch))
                bar.update(1)
        bar.close()
        model.train(was_training)
        stats = collector.stats.reduce_(all_reduce_fn(trainer))
        state = get_state(pl_module)
        state.stats = stats
        state.calibration_seconds = time.perf_counter() - start
        log.info("calibration: %d layers, %d input streams, %d tokens, %.1f MiB, %.1f s", len(stats.owner),
                 len(stats.streams), next(iter(stats.streams.values())).count, stats.nbytes() / 2**20,
                 state.calibration_seconds)
