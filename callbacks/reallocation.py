"""Rank reallocation: decide every factorized matrix's rank before truncation.

Runs the recipe's allocation strategy (:mod:`compression.allocation`: ``uniform``, ``v2``,
``greedy``, ``gradient``, ...) over the pipeline's matrices -- single layers, and with
``joint_qkv`` the stacked q/k/v of each attention module -- under a parameter or FLOPs budget.

For ``gradient`` (QSVD) every singular triplet gets the importance ``mean_b (σ_i u_iᵀ G_b r_i)²``
from calibration-loss gradients ``G_b`` (the family spec's ``training_loss``; with
``calibration.per_sample`` one sample per backward).  Under DDP each rank scores its own share of
``calibration.gradient_batches`` batches and the importance sums are all-reduced before the
(deterministic) selection, so every rank decides the same ranks.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import CompressionStage, all_reduce_fn, calibration_loader, pipeline_of, shard
from compression import CompressionPipeline, split_batch
from compression.block_capture import to_device

log = logging.getLogger(__name__)


class RankReallocation(CompressionStage, Callback):
    """Allocate ranks with ``recipe.allocation`` (gradient importances summed over processes)."""

    name = "reallocation"

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = pipeline_of(pl_module)
        if pipe.needs_fisher:  # the weights the importance bases (and the truncation) are taken in
            pipe.set_output_fisher(reduced_fisher(trainer, pipe, pl_module.spec.training_loss))
        importances = self._importances(trainer, pl_module) if pipe.needs_importance else None
        pipe.allocate(importances)

    def _importances(self, trainer: Trainer, pl_module: LightningModule) -> dict[str, torch.Tensor]:
        return reduced_importances(trainer, pipeline_of(pl_module), pl_module.spec.training_loss)


def _gradient_share(trainer: Trainer, pipe: CompressionPipeline, device: torch.device | None) -> list:
    """This rank's share of ``calibration.gradient_batches`` batches, moved to ``device`` when given."""
    batches = list(shard(calibration_loader(trainer, "gradient allocation"), pipe.recipe.calibration.gradient_batches,
                         trainer))
    return [to_device(b, device) for b in batches] if device is not None else batches


def reduced_fisher(trainer: Trainer, pipe: CompressionPipeline, loss, device: torch.device | None = None
                   ) -> dict[str, torch.Tensor]:
    """``calibration.output_fisher``: every targeted layer's squared output gradient summed over this rank's
    share of the gradient batches (whole batches), then over ranks."""
    fisher = pipe.output_fisher(_gradient_share(trainer, pipe, device), loss)  # zeros on a rank without batches
    reduce, root = all_reduce_fn(trainer), trainer.strategy.root_device
    return {k: reduce(v.clone().to(root), "sum").cpu() for k, v in fisher.items()}


def reduced_importances(trainer: Trainer, pipe: CompressionPipeline, loss, device: torch.device | None = None
                        ) -> dict[str, torch.Tensor]:
    """Importance of every singular triplet of ``pipe``'s matrices (its statistics set), from this rank's share
    of ``calibration.gradient_batches`` batches (moved to ``device`` when given), averaged over ranks."""
    settings = pipe.recipe.calibration
    batches = _gradient_share(trainer, pipe, device)
    if settings.per_sample:
        batches = [s for b in batches for s in split_batch(b)]
    count = torch.tensor(float(len(batches)), dtype=torch.float64)
    importance = pipe.importance(batches, loss)  # zeros on a rank without batches
    reduce = all_reduce_fn(trainer)  # reduces in place: hand it copies
    root = trainer.strategy.root_device
    sums = {k: reduce((v * count).to(root), "sum").cpu() for k, v in importance.items()}
    total = float(reduce(count.clone().to(root), "sum"))
    if total == 0:
        raise ValueError("gradient allocation saw no calibration batch; check the calibration loader")
    return {k: v / total for k, v in sums.items()}
