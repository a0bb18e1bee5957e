"""``SavePretrained``: after a dense training run, write the model as a ``save_pretrained`` folder.

For runs that train part of a transformers model without compressing it (LLaVA stage 1: the projector of
``models.vlm_real``), so the result loads again through the ordinary loaders (``load_vlm(folder)``, the
VLM configs' ``name_or_path``) instead of a Lightning checkpoint.  A compressed model is refused: its
factored layers are not a transformers architecture (use ``compressed.ckpt`` and its plan instead).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lightning.pytorch import Callback

log = logging.getLogger(__name__)


class SavePretrained(Callback):
    """Write ``save_pretrained`` of the module's model and its spec's processor at the end of fit.

    Args:
        dirpath: the folder (``None``: ``<log_dir>/pretrained``); written atomically, never overwritten.
    """

    def __init__(self, dirpath: str | None = None) -> None:
        self.dirpath = dirpath
        self.saved: Path | None = None

    def on_fit_end(self, trainer, pl_module) -> None:
        if pl_module.plan is not None:
            raise ValueError("SavePretrained writes dense transformers models; this run compressed the model "
                             "(use its compressed.ckpt) -- drop SavePretrained or the --compression recipe")
        processor = getattr(pl_module.spec, "processor", None) or getattr(pl_module.spec, "tokenizer", None)
        if processor is None:
            raise ValueError(f"{type(pl_module.spec).__name__} holds no processor or tokenizer to save")
        log_dir = Path(trainer.log_dir or trainer.default_root_dir)
        folder = Path(self.dirpath) if self.dirpath else log_dir / "pretrained"
        if folder.exists():
            raise FileExistsError(f"{folder} exists; SavePretrained never overwrites (choose another dirpath)")
        if trainer.is_global_zero:
            from models.vlm import save_vlm

            save_vlm(pl_module.model, processor, folder)
            log.info("saved the trained model to %s", folder)
        self.saved = folder
