"""Block-sequential compression as one stage: calibrate, allocate and truncate one block at a time.

Replaces the calibration -> reallocation -> truncation stages when the recipe says
``calibration: {mode: sequential}`` (:mod:`compression.sequential` has the maths and the memory bound).
Under DDP every rank propagates its own share of the calibration batches (round-robin, as the
all-at-once calibration shares them) and each block's statistics are all-reduced before the block is
compressed, so every rank computes the same factors.  With ``allocation: gradient`` the ranks are decided
first on the dense model (every matrix's Gram from the same calibration batches, reduced across ranks, then
``calibration.gradient_batches`` backward passes, as the all-at-once stages do) and the blocks are then
compressed at those ranks.  Rank zero shows a progress bar per block with
the running memory peak; every logger gets each block's output error ``compress/block_output_error``
(compressed vs dense block output on the calibration inputs, step = block index), the same error relative
to the block's residual update ``compress/block_update_error`` and its statistics bytes
``compress/block_stats_mib``.

With ``calibration.stream_weights`` the module built the model with its parameters on ``meta``
(``pl_module.weights_folder`` names its safetensors): the non-block weights are loaded, each block is read
just before it runs, written to a temporary folder once compressed and freed
(:class:`compression.streaming.BlockStream`); after the last block every compressed block is memory-mapped
back, so the later stages see an ordinary compressed model.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import CompressionStage, all_reduce_fn, calibration_loader, pipeline_of, shard
from compression import CompressionPipeline, collect_stats
from compression.block_capture import to_device
from compression.sequential import SequentialRun, block_paths
from compression.stats import STAT_FIELDS
from compression.streaming import BlockStream

log = logging.getLogger(__name__)


class SequentialCompression(CompressionStage, Callback):
    """Run :class:`compression.sequential.SequentialRun` on this rank's calibration batches."""

    name = "sequential"

    def __init__(self) -> None:
        self.records: list[dict] = []

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = pipeline_of(pl_module)
        settings = pipe.recipe.calibration
        batches = list(shard(calibration_loader(trainer, "sequential calibration"), settings.max_batches, trainer))
        if not batches:
            raise ValueError(f"process {trainer.global_rank} of {trainer.world_size} got no calibration batch; use "
                             "more calibration samples (or a smaller batch size) than processes")
        start = time.perf_counter()
        model = pl_module.model
        stream, out = None, None
        if settings.stream_weights:
            if getattr(pl_module, "weights_folder", None) is None:
                raise RuntimeError("calibration.stream_weights: the model was built with its weights loaded "
                                   "(CompressionModule builds it on meta when it streams)")
            out = tempfile.mkdtemp(prefix="svd-streamed-")
            stream = BlockStream.open(model, block_paths(model, pipe.family), pl_module.weights_folder, out)
        on_host = settings.block_device is not None or stream is not None
        if on_host:  # the model waits on the host: so do the batches
            host = next(model.parameters()).device
            batches = [to_device(b, host) for b in batches]
        was_training = model.training
        model.eval()
        device = None
        if settings.block_device is not None:  # a bare "cuda" means this rank's GPU
            device, root = torch.device(settings.block_device), trainer.strategy.root_device
            device = root if device.type == root.type and device.index is None else device
        elif stream is not None:  # streamed blocks are read on the host and run on the strategy's device
            device = trainer.strategy.root_device
        try:
            importances = fisher = None
            if pipe.needs_importance or pipe.needs_fisher:  # the whole dense model, before any block is cut
                importances, fisher = self._dense_signals(trainer, pl_module, batches, host if on_host else None)
            run = SequentialRun(pipe, pl_module.spec.calibration_forward, all_reduce_fn(trainer),
                                progress=settings.progress and trainer.is_global_zero, device=device, stream=stream)
            self.records = run.run(batches, importances, fisher)
            if stream is not None:
                mapped = stream.reload(model)
                log.info("stream_weights: %.1f MiB of compressed blocks mapped back from %s", mapped / 2**20, out)
        finally:
            model.train(was_training)
            if out is not None:  # the mapped files stay readable until the model lets go of them (POSIX)
                shutil.rmtree(out, ignore_errors=True)
        pl_module.calibration_seconds = time.perf_counter() - start
        if trainer.is_global_zero:
            for record in self.records:
                metrics = {"compress/block_output_error": record["output_error"],
                           "compress/block_update_error": record["update_error"],
                           "compress/block_stats_mib": record["stats_bytes"] / 2**20}
                for logger in trainer.loggers:
                    logger.log_metrics(metrics, step=record["block"])
        worst = max(self.records, key=lambda r: r["output_error"])
        log.info("sequential: %d blocks in %.1f s; largest block output error %.4g (%s); statistics peak %.1f MiB",
                 len(self.records), pl_module.calibration_seconds, worst["output_error"], worst["path"],
                 max(r["stats_bytes"] for r in self.records) / 2**20)

    @staticmethod
    def _dense_signals(trainer: Trainer, pl_module: LightningModule, batches: list,
                       device: torch.device | None) -> tuple[dict | None, dict | None]:
        """``(importances, fisher)`` of the dense model, before any block is cut, each reduced across ranks.
        ``calibration.output_fisher``: the output Fisher sums of this rank's gradient batches.  ``allocation:
        gradient``: every matrix's Gram from this rank's calibration batches (the ones the sequential pass
        reads), reduced across ranks, then the gradient importances (in the Fisher-weighted bases when set), as
        the all-at-once stages compute them; the Grams are freed before the first block runs."""
        from callbacks.reallocation import reduced_fisher, reduced_importances

        pipe = pipeline_of(pl_module)
        dense = CompressionPipeline(pl_module.model, pipe.recipe.all_at_once(), pipe.family)
        start = time.perf_counter()
        fisher = importances = None
        if dense.needs_fisher:
            fisher = reduced_fisher(trainer, dense, pl_module.spec.training_loss, device)
        if dense.needs_importance:
            stats = collect_stats(pl_module.model, dense.names, batches, forward=pl_module.spec.calibration_forward,
                                  needs=dense.stat_needs & STAT_FIELDS, device=pipe.recipe.calibration.stats_device)
            dense.set_statistics(stats.reduce_(all_reduce_fn(trainer)))
            if fisher is not None:
                dense.set_output_fisher(fisher)
            importances = reduced_importances(trainer, dense, pl_module.spec.training_loss, device)
            dense.stats = None
        log.info("sequential: %s of the dense model in %.1f s",
                 " and ".join(w for w, v in (("output Fisher", fisher), ("importances", importances)) if v is not None),
                 time.perf_counter() - start)
        return importances, fisher
