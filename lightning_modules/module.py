"""One generic LightningModule for every family: build, compress (via stage callbacks), train, score.

Everything structural happens in :meth:`configure_model`, which Lightning calls before it
restores a checkpoint and before the strategy wraps the model (DDP) or builds optimizers:

1. build the dense model from the family spec, on the strategy's root device;
2. if a checkpoint is being restored and it carries a compression plan (plain data), apply
   the plan so the factored structure exists before the weights load -- no recalibration; a
   recipe that differs from the one the checkpoint was made with is refused;
3. when fitting without a plan, build the run's :class:`~compression.CompressionPipeline` from
   the recipe and run the stage callbacks (built from the same recipe by
   :meth:`configure_callbacks`) in their fixed order: calibration -> reallocation -> truncation
   -> quantization (any callback with an ``on_compression_stage_end(trainer, pl_module, stage)``
   method is told after each); then the plan is built once; the U/V LoRA adapters attach last
   (also on resume, before the weights load).  With ``calibration: {mode: sequential}`` one stage
   (:class:`callbacks.SequentialCompression`) replaces calibration, reallocation and truncation;
   with ``calibration.block_device`` set as well, the model waits on the host while its blocks visit
   that device one at a time, and moves to the strategy's device after compression.  With
   ``calibration.stream_weights`` the model is built with its parameters on ``meta`` (``spec.build_streamed``)
   and the sequential stage reads each block from the model's safetensors just before it runs.

The CLI tells the module the checkpoint (``checkpoint_path``) before ``fit``/``validate``/``test``
start, so ``--ckpt_path`` never recalibrates.  In your own code set ``trainer.ckpt_path = PATH``
before ``trainer.fit(module)`` (with ``fit(ckpt_path=PATH)`` Lightning names the file only after
this hook: the run would compress again and then refuse a checkpoint whose plan differs).

Compressing any later (e.g. in ``on_fit_start``) would swap layers under an already built
DDP wrapper and optimizer.
"""

from __future__ import annotations

import copy
import functools
import itertools
import logging
import math
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import nn

from compression import CompressionPipeline, Recipe, apply_plan
from lightning_modules.specs import ModelSpec

log = logging.getLogger(__name__)

PLAN_KEY = "compression_plan"
LORA_KEY = "uv_lora"  # written by callbacks.lora.UVLoRA while adapters are attached


class RecipeMismatch(ValueError):
    """The recipe of this run differs from the one a checkpoint's plan was made with."""


class CompressionModule(LightningModule):
    """Wraps a model family's ``spec`` and a compression ``recipe``; the stages are callbacks.

    Args:
        spec: the model family (e.g. ``lightning_modules.CausalLMSpec``).
        compression: the compression recipe (``None``: a dense run); on the command line it is
            the top-level ``--compression`` (``--compression.ratio 0.4``).
        evaluate_dense: score the dense model on the test loaders before compressing (for the
            dense-vs-compressed summary; one extra evaluation pass).
        learning_rate: AdamW learning rate for whatever parameters are trainable
            (the LoRA stages freeze everything else).
        weight_decay: AdamW weight decay.
        lr_schedule: ``constant``, or ``cosine``: LLaVA's schedule -- linear warm-up over the first
            ``warmup_ratio`` of ``trainer.max_steps``, then cosine decay to 0 at ``max_steps`` (per step).
        warmup_ratio: the warm-up fraction of ``cosine`` (LLaVA: 0.03).
    """

    def __init__(self, spec: ModelSpec, compression: Recipe | None = None, evaluate_dense: bool = False,
                 learning_rate: float = 1e-4, weight_decay: float = 0.0, lr_schedule: str = "constant",
                 warmup_ratio: float = 0.03) -> None:
        super().__init__()
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {lr_schedule!r}")
        if not 0 <= warmup_ratio < 1:
            raise ValueError(f"warmup_ratio must be in [0, 1), got {warmup_ratio}")
        if lr_schedule != "constant" and compression is not None and compression.lora.schedule != "constant":
            # refused here, before any calibration; UVLoRA also refuses a scheduler given another way (the CLI's)
            raise ValueError(f"compression.lora.schedule {compression.lora.schedule!r} sets the learning rate of "
                             "every LoRA step itself; leave the module's lr_schedule at 'constant' (a second "
                             "scheduler would fight it)")
        self.save_hyperparameters(ignore=["spec", "compression"])
        self.spec = spec
        self.recipe = compression
        self.evaluate_dense = evaluate_dense
        self.checkpoint_path: str | None = None  # set by the CLI from --ckpt_path before the trainer runs
        self.weights_folder: str | None = None  # calibration.stream_weights: where the blocks are read from
        self.model: nn.Module | None = None
        self.plan: dict | None = None  # built by the compression stages or restored from a checkpoint
        self.plan_restored = False
        self.pipeline: CompressionPipeline | None = None
        self.report = None
        self.dense_metrics: dict[str, dict[str, float]] = {}
        self.dense_val_metrics: dict[str, float] = {}  # the dense model on the validation batches fit scores
        self.calibration_seconds = 0.0
        self._stages: list[Callback] | None = None
        self.val_metrics: nn.Module | None = None
        self.test_metrics = nn.ModuleList()
        self.test_names: list[str] = []

    # -- stages -----------------------------------------------------------------------------------
    def stage_callbacks(self) -> list[Callback]:
        """The recipe's stage callbacks in run order (built once)."""
        if self._stages is None:
            from callbacks import (
                Quantization,
                RankReallocation,
                SequentialCompression,
                SVDTruncation,
                UVLoRA,
                WhiteningCollection,
            )

            recipe, stages = self.recipe, []
            if recipe is not None:
                if recipe.lowrank and recipe.calibration.sequential:
                    stages.append(SequentialCompression())
                elif recipe.lowrank:
                    stages += [WhiteningCollection(), RankReallocation(), SVDTruncation()]
                if recipe.quantization.enabled:
                    stages.append(Quantization())
                if recipe.lora.enabled:
                    stages.append(UVLoRA(recipe.lora))
            self._stages = stages
        return self._stages

    def configure_callbacks(self) -> list[Callback]:
        from callbacks.lora import UVLoRA
        from callbacks.state import CompressionStage

        trainer = self._trainer
        listed = [type(cb).__name__ for cb in (trainer.callbacks if trainer is not None else [])
                  if isinstance(cb, CompressionStage | UVLoRA) and cb not in (self._stages or [])]
        if listed:
            raise ValueError(f"trainer.callbacks lists {listed}: the compression stages come from the recipe "
                             "(--compression); remove them from trainer.callbacks")
        if trainer is not None and trainer.state.fn != TrainerFn.FITTING:
            return []  # the stages act when fitting only (validate/test after fit would re-attach them)
        return self.stage_callbacks()

    # -- model ------------------------------------------------------------------------------------
    def configure_model(self) -> None:
        if self.model is not None:
            return
        trainer = self._trainer
        if self._streams_weights(trainer):
            self.model, self.weights_folder = self.spec.build_streamed()
        else:
            self.model = self.spec.build()
        self.val_metrics = self.spec.make_metrics()
        if trainer is None:
            return
        recipe = self.recipe
        on_host = (trainer.state.fn == TrainerFn.FITTING and recipe is not None and recipe.lowrank
                   and recipe.calibration.sequential and recipe.calibration.block_device is not None)
        if not on_host and self.weights_folder is None:
            self.model.to(trainer.strategy.root_device)
        check = getattr(trainer.datamodule, "check_model", None)
        if callable(check):  # e.g. a tokenizer whose ids the model cannot embed: refused before any work
            check(self.model)
        if trainer.state.fn == TrainerFn.FITTING and self.recipe is not None and self.recipe.lora.enabled \
                and self.recipe.lora.distill > 0:
            self._keep_teacher()
        path = self.checkpoint_path or trainer.ckpt_path
        if path:
            self.plan = read_plan(path)
        if self.plan is not None:
            check_recipe(self.recipe, self.plan, path)
            self.plan_restored = True  # compression stages that transform weights skip themselves
            changed = apply_plan(self.model, self.plan)
            log.info("rebuilt %d low-rank layers from the compression plan", len(changed))
        if trainer.state.fn != TrainerFn.FITTING:
            return
        stages = self.stage_callbacks()
        from callbacks.lora import UVLoRA

        if self.plan is None and any(not isinstance(s, UVLoRA) for s in stages):
            self._compress(trainer, [s for s in stages if not isinstance(s, UVLoRA)])
        self.model.to(trainer.strategy.root_device)  # a no-op unless the blocks were streamed to block_device
        for stage in stages:
            if isinstance(stage, UVLoRA):  # adds structure: also on resume, before the weights load
                stage.run_compression_stage(trainer, self)

    def _streams_weights(self, trainer) -> bool:
        """``calibration.stream_weights`` when fitting without a checkpoint (a checkpoint brings its own weights);
        refuses what needs the whole dense model in memory."""
        recipe = self.recipe
        if trainer is None or recipe is None or not recipe.calibration.stream_weights:
            return False
        if trainer.state.fn != TrainerFn.FITTING or self.checkpoint_path or trainer.ckpt_path:
            return False
        if self.evaluate_dense:
            raise ValueError("calibration.stream_weights never holds the whole dense model, so it cannot be "
                             "evaluated first; set model.evaluate_dense false (--model.evaluate_dense false)")
        if recipe.lora.enabled and recipe.lora.distill > 0:
            raise ValueError("calibration.stream_weights never holds the whole dense model, which lora.distill needs "
                             "as its teacher; set compression.lora.distill 0 or stream_weights false")
        return True

    def _keep_teacher(self) -> None:
        """A frozen copy of the dense model for ``lora.distill`` (a plain attribute: never in checkpoints,
        never wrapped by DDP, not trained)."""
        if type(self.spec).distillation_loss is ModelSpec.distillation_loss:
            raise ValueError(f"compression.lora.distill needs a distillation loss, which {type(self.spec).__name__} "
                             "does not define; set compression.lora.distill: 0")
        teacher = copy.deepcopy(self.model).eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)

    def _compress(self, trainer, stages: list[Callback]) -> None:
        if self.evaluate_dense:
            self._evaluate_dense(trainer)
        self.pipeline = CompressionPipeline(self.model, self.recipe, self.spec)
        for stage in stages:
            stage.run_compression_stage(trainer, self)
            for callback in trainer.callbacks:  # observers: any callback may define this hook
                hook = getattr(callback, "on_compression_stage_end", None)
                if hook is not None:
                    hook(trainer, self, stage.name)
        self.report = self.pipeline.finish()
        self.plan = self.report.plan
        self.pipeline.stats = None  # free the Grams: nothing downstream needs them
        if self.report.layers:
            log.info("compressed %d matrices: removed %.4f of their parameters, %.4f of all targeted ones (%d matrices "
                     "kept dense)", len(self.report.layers), self.report.params_ratio, self.report.targets_ratio,
                     len(self.report.kept_dense))
        if trainer.is_global_zero:
            from callbacks.tb import log_compression

            spectra = next((getattr(s, "spectra", {}) for s in stages if getattr(s, "name", "") == "truncation"), {})
            log_compression(trainer, self.report, spectra)

    def _evaluate_dense(self, trainer) -> None:
        dm = trainer.datamodule
        loaders = dm.test_dataloader()
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        names = list(getattr(dm, "test_names", None) or [f"test{i}" for i in range(len(loaders))])
        for name, loader in zip(names, loaders):
            self.dense_metrics[name] = self.evaluate_loader(loader)
            log.info("dense %s: %s", name, self.dense_metrics[name])
        limit = trainer.limit_val_batches
        if limit and is_overridden("val_dataloader", dm):  # the same batches the validation loop will score
            loader = dm.val_dataloader()
            batches = min(len(loader), limit) if isinstance(limit, int) else int(len(loader) * limit)
            self.dense_val_metrics = self.evaluate_loader(itertools.islice(loader, batches))
            log.info("dense validation (%d batches): %s", batches, self.dense_val_metrics)

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
        teacher = self.__dict__.get("teacher")
        autocast = self.recipe.lora.autocast if self.recipe is not None else None
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=autocast == "bfloat16"):
            if teacher is None:
                loss = self.spec.training_loss(self.model, batch)
            else:  # lora.distill: a mix of matching the dense model and the task loss, from one forward
                weight = self.recipe.lora.distill
                distill, task = self.spec.distillation_loss(self.model, teacher, batch, self.recipe.lora.temperature)
                loss = weight * distill + (1.0 - weight) * task
                self.log_dict({"train/distill": distill.detach(), "train/task": task.detach()})
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss at step {self.global_step} (batch {batch_idx})")
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        if not params:
            raise ValueError("no trainable parameters: a LoRA stage should have unfrozen its adapters")
        own = self.spec.learning_rates(self.model) if self.model is not None else {}
        groups = []
        for prefix, lr in own.items():
            mine = [p for n, p in params if n.startswith(f"model.{prefix}.")]
            if not mine:
                raise ValueError(f"a learning rate is set for {prefix!r}, which has no trainable parameters")
            groups.append({"params": mine, "lr": lr})
        taken = {id(p) for g in groups for p in g["params"]}
        rest = [p for _, p in params if id(p) not in taken]
        if rest:
            groups.append({"params": rest, "lr": self.hparams.learning_rate})
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.learning_rate, weight_decay=self.hparams.weight_decay)
        if self.hparams.get("lr_schedule", "constant") == "constant":
            return optimizer
        total = self.trainer.max_steps if self._trainer is not None else -1
        if total is None or total < 1:
            raise ValueError("lr_schedule 'cosine' decays to 0 at trainer.max_steps; set --trainer.max_steps")
        from callbacks.lora import cosine_factor  # callbacks import this module

        warmup = math.ceil(self.hparams.warmup_ratio * total)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, functools.partial(cosine_factor, warmup, total))
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

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
    """The compression plan stored in a Lightning checkpoint, without loading its tensors (mmap).

    Never unpickles code: ``weights_only=True`` (a checkpoint whose pickle names anything but
    tensors and plain containers is refused with the file's name)."""
    from compression.io import safe_torch_load

    checkpoint = safe_torch_load(ckpt_path, mmap=True)
    plan = checkpoint.get(PLAN_KEY) if isinstance(checkpoint, dict) else None
    if plan is not None:
        from compression.plan import validate_plan

        validate_plan(plan)
    return plan


def check_recipe(recipe: Recipe | None, plan: dict, path: str | None) -> None:
    """Refuse a recipe that differs from the one ``plan`` was made with (``None`` accepts the plan's)."""
    if recipe is None:
        return
    made_with = plan.get("recipe")
    if made_with is None:
        log.warning("checkpoint %s predates recipes in plans; cannot check that --compression matches it", path)
        return
    changed = recipe.differences(made_with)
    if changed:
        raise RecipeMismatch(
            f"checkpoint {path} was compressed with another recipe; this run changes " + "; ".join(changed)
            + ". Drop the --compression changes to resume it, or start a new run without --ckpt_path")
