"""Quantization stage (QSVD / QuaRot): rotations, the Σ split β, fake-quantized weights and activations.

Runs the pipeline's quantize stage (:mod:`compression.quantize_stage`) with ``recipe.quantization``,
after truncation (or alone, for rotation-only QuaRot: ``method: null``).  The β search and GPTQ
read ``quantization.max_batches`` calibration batches evenly spread over the loader -- the same
batches on every rank, and rotations are seeded, so DDP ranks build identical weights.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import CompressionStage, calibration_loader, pipeline_of, same_on_every_rank

log = logging.getLogger(__name__)


class Quantization(CompressionStage, Callback):
    """Rotate, rebalance and fake-quantize the (compressed) model before training or evaluation."""

    name = "quantization"

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = pipeline_of(pl_module)
        batches = None
        if pipe.needs_batches:
            loader = calibration_loader(trainer, "quantization (β search / GPTQ)")
            batches = same_on_every_rank(trainer, loader, pipe.recipe.quantization.max_batches)
        pipe.quantize(batches)
