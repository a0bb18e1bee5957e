"""What the compression stage callbacks share: the run's pipeline, data sharding and reductions.

A compression run has one :class:`compression.CompressionPipeline`, built from the recipe by
``CompressionModule.configure_model`` and kept on the module (``pl_module.pipeline``).  The
stage callbacks (calibration -> reallocation -> truncation -> quantization -> U/V LoRA) are built
by the module from the same recipe (``CompressionModule.configure_callbacks``) and called by it in
that fixed order before the strategy wraps the model; each runs one stage of the pipeline.
Nobody finds a callback by type or position.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
import torch.distributed as dist
from lightning.pytorch import LightningModule, Trainer

from compression import CompressionPipeline, spread_batches


class CompressionStage:
    """Base of the stage callbacks: ``run_compression_stage(trainer, pl_module)``."""

    name = "stage"

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        raise NotImplementedError


def pipeline_of(pl_module: LightningModule) -> CompressionPipeline:
    pipe = getattr(pl_module, "pipeline", None)
    if pipe is None:
        raise RuntimeError("no compression pipeline on the module: compression stages run from "
                           "CompressionModule.configure_model with a recipe (--compression)")
    return pipe


def already_compressed(pl_module: LightningModule) -> bool:
    """True when the model carries a plan (compressed in this run or restored from a checkpoint)."""
    return getattr(pl_module, "plan", None) is not None


def plan_restored(pl_module: LightningModule) -> bool:
    """True when the plan came from a checkpoint (not made by this run's compression stages)."""
    return bool(getattr(pl_module, "plan_restored", False))


def calibration_loader(trainer: Trainer, needed_by: str):
    dm = trainer.datamodule
    if dm is None or not callable(getattr(dm, "calibration_dataloader", None)):
        raise RuntimeError(f"{needed_by} needs a datamodule with a calibration_dataloader() method")
    return dm.calibration_dataloader()


def shard(loader: Iterable, max_batches: int | None, trainer: Trainer) -> Iterator[Any]:
    """This process's share of ``max_batches`` batches evenly spread over ``loader`` (round-robin by
    batch, so every batch is seen by exactly one rank; a DistributedSampler would pad with duplicates)."""
    rank, world = trainer.global_rank, trainer.world_size
    for i, batch in enumerate(spread_batches(loader, max_batches)):
        if i % world == rank:
            yield trainer.strategy.batch_to_device(batch)


def same_on_every_rank(trainer: Trainer, loader: Iterable, max_batches: int | None) -> Callable[[], Iterator[Any]]:
    """A fresh iterator of ``max_batches`` batches evenly spread over ``loader``, on the device
    (every rank reads the same batches: the stage's result must be identical across ranks)."""

    def batches() -> Iterator[Any]:
        for batch in spread_batches(loader, max_batches):
            yield trainer.strategy.batch_to_device(batch)

    return batches


def all_reduce_fn(trainer: Trainer) -> Callable[[torch.Tensor, str], torch.Tensor]:
    """``fn(tensor, op)`` for :meth:`ActivationStats.reduce_`: identity on one process."""

    def fn(t: torch.Tensor, op: str) -> torch.Tensor:
        if trainer.world_size == 1 or not (dist.is_available() and dist.is_initialized()):
            return t
        t = t.contiguous()
        dist.all_reduce(t, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        return t

    return fn
