"""SVD truncation: factorize every allocated matrix (the pipeline's truncate stage), then log spectra.

With ``joint_qkv`` (QSVD) the q/k/v of every attention module the family spec names are one
stacked matrix with a shared down projection; the other targets are factorized per matrix.  If any
decomposition fails, every layer is put back as it was.
"""

from __future__ import annotations

import logging

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import CompressionStage, pipeline_of

log = logging.getLogger(__name__)


class SVDTruncation(CompressionStage, Callback):
    """Factorize the targeted matrices at the allocated ranks.

    Args:
        log_spectra: number of matrices whose singular-value spectra are plotted to TensorBoard.
    """

    name = "truncation"

    def __init__(self, log_spectra: int = 6) -> None:
        self.log_spectra = log_spectra
        self.spectra: dict[str, torch.Tensor] = {}

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pipe = pipeline_of(pl_module)
        if trainer.is_global_zero and self.log_spectra > 0:
            self.spectra = self._spectra(pipe)
        with torch.no_grad():
            reports = pipe.truncate()
        log.info("truncation: %d matrices factorized", len(reports))

    def _spectra(self, pipe) -> dict[str, torch.Tensor]:
        """Singular values of ``log_spectra`` evenly spaced matrices, in the method's space."""
        keys = [k for k in pipe.matrices if k not in pipe.allocation.dense]
        step = max(1, len(keys) // self.log_spectra)
        known = pipe.allocation.spectra
        return {k: known[k] if k in known else pipe.spectrum(k) for k in keys[::step][: self.log_spectra]}
