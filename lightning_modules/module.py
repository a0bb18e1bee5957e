"""One generic LightningModule for every family: build, compress (via callbacks), train, score.

Everything structural happens in :meth:`configure_model`, which Lightning calls before it
restores a checkpoint and before the strategy wraps the model (DDP) or builds optimizers:

1. build the dense model from the family spec, on the strategy's root device;
2. if a checkpoint is being restored and it carries a compression plan (plain data), apply
   the plan so the factored structure exists before the weights load -- no recalibration;
3. when fitting, run the compression stages of the callbacks in ``trainer.callbacks`` order
   (calibration -> rank reallocation -> truncation -> LoRA adapters); with a restored plan the
   first three skip themselves, the adapters are re-attached before the weights load.

Lightning tells ``configure_model`` the checkpoint only when it was set as
``trainer.ckpt_path = PATH`` before ``fit``; with ``fit(ckpt_path=PATH)`` the path arrives
after this hook, so the model is recalibrated and recompressed, then the checkpoint (whose
plan must match) overwrites it -- correct, but slower; :meth:`on_load_checkpoint` also
rebuilds the plan for ``validate``/``test``.

Compressing any later (e.g. in ``on_fit_start``) would swap layers under an already built
DDP wrapper and optimizer.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from torch import nn

from compression import apply_plan
from lightning_modules.specs import ModelSpec

log = logging.getLogger(__name__)

PLAN_KEY = "compression_plan"
LORA_KEY = "uv_lora"  # written by callbacks.lora.UVLoRA while adapters are attached


class CompressionModule(LightningModule):
    """Wraps a model family's ``spec``; the compression itself is done by callbacks.

    Args:
        spec: the model family (e.g. ``lightning_modules.CausalLMSpec``).
        learning_rate: AdamW learning rate for whatever parameters are trainable
            (the LoRA stages freeze everything else).
        weight_decay: AdamW weight decay.
    """

    def __init__(self, spec: ModelSpec, learning_rate: float = 1e-4, weight_decay: float = 0.0) -> None:
        super().__init__()
        self.save_hyperparameters(ignore=["spec"])
        self.spec = spec
        self.model: nn.Module | None = None
        self.plan: dict | None = None  # set by the truncation callback or restored from a checkpoint
        self.plan_restored = False
        self.val_metrics: nn.Module | None = None
        self.test_metrics = nn.ModuleList()
        self.test_names: list[str] = []

    # -- model ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        self.model = self.spec.build()
        self.val_metrics = self.spec.make_metrics()
        trainer = self._trainer
        if trainer is None:
            return
        self.model.to(trainer.strategy.root_device)
        if trainer.ckpt_path:
            self.plan = read_plan(trainer.ckpt_path)
        if self.plan is not None:
            self.plan_restored = True  # compression stages that transform weights skip themselves
            changed = apply_plan(self.model, self.plan)
            log.info("rebuilt %d low-rank layers from the compression plan", len(changed))
        if trainer.state.fn == TrainerFn.FITTING:
            # with a restored plan the calibration/truncation stages skip themselves; stages that add
            # structure (UVLoRA adapters) must still run so the checkpoint's state dict fits the model
            for callback in trainer.callbacks:
                stage = getattr(callback, "run_compression_stage", None)
                if stage is not None:
                    stage(trainer, self)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.model(*args, **kwargs)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.plan is not None:
            checkpoint[PLAN_KEY] = self.plan

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        plan = checkpoint.get(PLAN_KEY)
        if plan is not None and self.model is not None:
            if self.plan is not None and self.plan != plan:
                raise ValueError(
                    "this run compressed the model differently from the checkpoint's plan. Lightning names the "
                    "checkpoint of `fit(ckpt_path=...)` only after configure_model, so the model was recalibrated; "
                    "resume with `trainer.ckpt_path = PATH` before `trainer.fit(...)` to rebuild the plan instead"
                )
            self.plan = plan
            apply_plan(self.model, plan)  # no-op when configure_model already rebuilt it
        has_adapters = self.model is not None and any(".lora_" in n for n, _ in self.model.named_parameters())
        lora = checkpoint.get(LORA_KEY)
        if has_adapters and lora is None:
            raise ValueError(
                "this run attached LoRA adapters (UVLoRA) but the checkpoint holds none: UVLoRA resumes only "
                "checkpoints saved during its stages; to recover a compressed model, run compression and UVLoRA "
                "in one fit (configs/llm/lora.yaml)"
            )
        if lora is not None and not has_adapters and self.model is not None:
            # a checkpoint saved mid-LoRA, loaded without the adapters (evaluation): fold them into the factors
            from callbacks.lora import fold_lora_state_dict_

            n = fold_lora_state_dict_(checkpoint["state_dict"], float(lora["scaling"]))
            log.info("folded %d LoRA adapters of the checkpoint into the low-rank factors", n)

    # -- training ---------------------------------------------------------------------------------
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.spec.training_loss(self.model, batch)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step} (batch {batch_idx})")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: a LoRA stage should have unfrozen its adapters")
        return torch.optim.AdamW(params, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)

    # -- evaluation -------------------------------------------------------------------------------
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        loss = self.spec.evaluate(self.model, batch, self.val_metrics, batch_idx)
        self.log("val/loss", loss, sync_dist=True)

    def on_validation_epoch_end(self) -> None:
        for key, value in self.spec.compute_metrics(self.val_metrics).items():
            self.log(f"val/{key}", value, prog_bar=True, sync_dist=False)
        self.val_metrics.reset()

    def on_test_start(self) -> None:
        dm = self.trainer.datamodule
        self.test_names = list(getattr(dm, "test_names", None) or ["test"])
        self.test_metrics = nn.ModuleList([self.spec.make_metrics() for _ in self.test_names]).to(self.device)

    def test_step(self, batch: Any, batch_idx: int, dataloader_idx: int = 0) -> None:
        self.spec.evaluate(self.model, batch, self.test_metrics[dataloader_idx], batch_idx)

    def on_test_epoch_end(self) -> None:
        for name, metrics in zip(self.test_names, self.test_metrics):
            for key, value in self.spec.compute_metrics(metrics).items():
                self.log(f"test/{key}/{name}", value, sync_dist=False)
            metrics.reset()

    @torch.no_grad()
    def evaluate_loader(self, loader: Any) -> dict[str, float]:
        """Score one dataloader outside the Lightning loops (e.g. the dense model before compression)."""
        device = self._trainer.strategy.root_device if self._trainer else next(self.model.parameters()).device
        metrics = self.spec.make_metrics().to(device)
        was_training = self.model.training
        self.model.eval()
        for i, batch in enumerate(loader):
            batch = self._trainer.strategy.batch_to_device(batch) if self._trainer else batch
            self.spec.evaluate(self.model, batch, metrics, i)
        self.model.train(was_training)
        return {k: float(v) for k, v in self.spec.compute_metrics(metrics).items()}


def read_plan(ckpt_path: str) -> dict | None:
    """The compression plan stored in a Lightning checkpoint, without loading its tensors (mmap)."""
    checkpoint = torch.load(ckpt_path, map_location="cpu", mmap=True, weights_only=False)
    return checkpoint.get(PLAN_KEY)
