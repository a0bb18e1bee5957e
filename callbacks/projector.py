"""``ProjectorInputNormalization``: at the start of a fresh fit, standardize a LLaVA projector's input.

Calls :meth:`lightning_modules.vlm_spec.VLMSpec.normalize_projector_input_` on the pixel values of the first
``batches`` training batches: the per-channel mean and standard deviation of the vision features are folded
into the projector's first Linear (the architecture stays LLaVA's).  A run resumed from a checkpoint, or a model
whose config says the fold was done (a saved stage-1 model trained further), skips it.  Refused under several
processes: each would fold its own batches.
"""

from __future__ import annotations

import logging
from itertools import islice

from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class ProjectorInputNormalization(Callback):
    """Fold training-feature statistics into the projector's ``linear_1`` at ``on_fit_start``.

    Args:
        batches: training batches whose images give the statistics (every image token counts).
    """

    def __init__(self, batches: int = 8) -> None:
        if batches < 1:
            raise ValueError(f"batches must be >= 1, got {batches}")
        self.batches = batches
        self.statistics = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if getattr(trainer, "ckpt_path", None):
            log.info("resumed from %s: the projector's input normalization is already in its weights",
                     trainer.ckpt_path)
            return
        from lightning_modules.vlm_spec import NORMALIZED_FLAG

        if getattr(getattr(pl_module.model, "config", None), NORMALIZED_FLAG, False):
            log.info("the projector's input normalization is already in its weights (config.%s, e.g. a stage-1 "
                     "model trained further): not folded again", NORMALIZED_FLAG)
            return
        if getattr(trainer, "world_size", 1) > 1:
            raise ValueError("ProjectorInputNormalization runs in one process only (each rank would fold other "
                             "statistics); drop it from trainer.callbacks or train on one device")
        spec = pl_module.spec
        if not hasattr(spec, "normalize_projector_input_"):
            raise ValueError(f"ProjectorInputNormalization needs a VLM spec, got {type(spec).__name__}")
        loader = trainer.datamodule.train_dataloader()
        pixels = [spec._train_part(batch)["pixel_values"] for batch in islice(loader, self.batches)]
        if len(pixels) < self.batches:
            log.warning("ProjectorInputNormalization: the training loader gave %d of %d batches", len(pixels),
                        self.batches)
        self.statistics = spec.normalize_projector_input_(pl_module.model, pixels)
