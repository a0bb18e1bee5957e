"""Alternating U/V LoRA recovery (SVD-LLM): tune one side of every low-rank factor, merge, then the other.

Every :class:`~compression.lowrank.LowRankLinear` ``y = U (V x)`` (``down = V``, ``r x in``;
``up = U``, ``out x r``) gets a peft LoRA adapter on BOTH factors::

    down(x) = V x + (α/k) B_V A_V x        up(z) = U z + (α/k) B_U A_U z     (LoRA rank k)

Stage 1 (default ``down``, the V side: the SVD-LLM paper's best numbers came from V first)
trains only its side's adapters; at the stage boundary they are merged into the factor,
``V <- V + (α/k) B_V A_V`` -- same ``r x in`` shape, so the rank and the plan are
unchanged -- and ``B_V`` is zeroed; stage 2 trains the other side the same way, and at the
end of fit everything is merged and the adapter wrappers removed, so the model is a plain
compressed model again (export, ``evaluate.py``).  A stage whose ``order`` entry is ``both`` trains
the U and V adapters together (the backward computes both sides' gradients in any case, so
joint training updates twice the adapters for the same step cost); at its end both sides merge
and their ``B`` restart from zero with fresh optimizer moments.

Design (why a fixed structure and step boundaries):

- One fit run; stage boundaries are global optimizer steps (stage 1 = ``[0, s1)``, stage 2 =
  ``[s1, s1 + s2)``; ``epochs`` convert to steps at train start).  Both sides' adapters exist
  from ``configure_model`` on, so the module structure never changes during fit: a resumed
  run rebuilds the plan, re-attaches the same adapters BEFORE the checkpoint's state dict
  loads (``run_compression_stage`` is called from ``CompressionModule.configure_model``),
  and the stage comes back from the global step and the callback's ``state_dict``.
- All adapter parameters keep ``requires_grad=True`` and sit in ONE optimizer; the inactive
  side's gradients are dropped in ``on_before_optimizer_step`` (AdamW skips parameters
  without a gradient: no update, no weight decay, no moment state).  Toggling
  ``requires_grad`` at the boundary instead would break DDP: ``DistributedDataParallel``
  registers the parameters that require grad when it wraps the model, so the stage-2
  adapters would never be all-reduced.  This also avoids rebuilding optimizers mid-fit.
- Everything that is not an adapter is frozen (peft does that; checked and logged).
- The stage's random draws are its own: peft draws ``lora_A`` from a generator seeded with ``lora.seed`` (default:
  the run's ``seed_everything``), and a fresh fit reseeds the global generator with ``seed + 1`` at train start
  (dropout masks).  Otherwise they would come from wherever the compression stages left the global generator, and
  a compression change that draws one number fewer would move every recovery.
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from torch import nn

from callbacks.state import already_compressed
from compression import LoRARecipe, LowRankLinear
from compression.plan import set_submodule
from compression.targets import name_matches

log = logging.getLogger(__name__)

SIDES = ("down", "up")
ADAPTER = "default"
CHECKPOINT_KEY = "uv_lora"


def lora_layers(model: nn.Module, side: str | None = None) -> dict[str, nn.Module]:
    """``name -> peft LoRA layer`` wrapping a low-rank factor (``side``: ``down``/``up``/both)."""
    from peft.tuners.lora import LoraLayer

    out = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and (side is None or name.rsplit(".", 1)[-1] == side):
            out[name] = module
    return out


@torch.no_grad()
def merge_side_(model: nn.Module, side: str) -> int:
    """Fold ``side``'s adapters into the factor weights (shapes unchanged) and zero their ``B``."""
    layers = lora_layers(model, side)
    for layer in layers.values():
        base = layer.get_base_layer()
        base.weight.add_(layer.get_delta_weight(ADAPTER).to(base.weight.dtype))
        layer.lora_B[ADAPTER].weight.zero_()
    return len(layers)


@torch.no_grad()
def merge_and_unwrap_lora_(model: nn.Module) -> int:
    """Merge every adapter into its factor and put the plain ``nn.Linear`` factor back; returns the count."""
    layers = lora_layers(model)
    for name, layer in layers.items():
        base = layer.get_base_layer()
        base.weight.add_(layer.get_delta_weight(ADAPTER).to(base.weight.dtype))
        set_submodule(model, name, base)
    return len(layers)


@torch.no_grad()
def fold_lora_state_dict_(state_dict: dict[str, torch.Tensor], scaling: float) -> int:
    """Rewrite a state dict saved with adapters into the plain compressed layout, in place.

    ``<f>.base_layer.weight + scaling * <f>.lora_B.default.weight @ <f>.lora_A.default.weight``
    becomes ``<f>.weight`` (and ``<f>.base_layer.bias`` -> ``<f>.bias``), so a mid-LoRA
    checkpoint evaluates on a model built from the plan alone.  Returns the folded count.
    """
    folded = 0
    for key in [k for k in state_dict if k.endswith(".base_layer.weight")]:
        prefix = key[: -len(".base_layer.weight")]
        weight = state_dict.pop(key)
        a = state_dict.pop(f"{prefix}.lora_A.{ADAPTER}.weight", None)
        b = state_dict.pop(f"{prefix}.lora_B.{ADAPTER}.weight", None)
        if a is not None and b is not None:
            weight = weight + (scaling * (b.double() @ a.double())).to(weight.dtype)
            folded += 1
        state_dict[f"{prefix}.weight"] = weight
        bias = state_dict.pop(f"{prefix}.base_layer.bias", None)
        if bias is not None:
            state_dict[f"{prefix}.bias"] = bias
    return folded


_BASE_LR = "uvlora_base_lr"


def _cuda_devices() -> list[int]:
    """Every CUDA device, so that seeding inside ``fork_rng`` leaves no generator changed (none without CUDA)."""
    return list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []


def cosine_factor(warmup: int, total: int, step: int) -> float:
    """Learning-rate factor at ``step`` (0-based) of ``total``: linear warm-up to 1 over ``warmup`` steps
    (``(step + 1) / warmup``), then cosine decay to 0 at ``total`` (LLaVA's schedule; the module's
    ``lr_schedule: cosine`` over the whole fit, ``lora.schedule: cosine`` within each stage)."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, total - warmup) / max(1, total - warmup)))


def _sides(entry: str) -> tuple[str, ...]:
    """The factors an ``order`` entry trains: ``down``, ``up`` or ``both``."""
    return SIDES if entry == "both" else (entry,)


def _per_stage(value: Any, name: str, cast: type) -> list | None:
    if value is None:
        return None
    values = list(value) if isinstance(value, list | tuple) else [value, value]
    if len(values) != 2:
        raise ValueError(f"UVLoRA {name} needs one value or one per stage (2), got {value!r}")
    return [cast(v) for v in values]


class UVLoRA(Callback):
    """Alternating U/V LoRA recovery of the low-rank factors (see module docstring), from ``recipe.lora``.

    Built by ``CompressionModule.configure_callbacks`` when the recipe's ``lora`` part is set
    (``steps`` or ``epochs``); runs after the compression stages.
    """

    def __init__(self, recipe: LoRARecipe) -> None:
        if not recipe.enabled:
            raise ValueError("UVLoRA needs lora.steps or lora.epochs (per stage)")
        self.recipe = recipe
        self.order = list(recipe.order)
        self.steps = _per_stage(recipe.steps, "steps", int)
        self.epochs = _per_stage(recipe.epochs, "epochs", int)
        self.r, self.alpha, self.dropout = recipe.r, recipe.alpha, recipe.dropout
        self.learning_rate = _per_stage(recipe.learning_rate, "learning_rate", float)
        self.schedule, self.warmup = recipe.schedule, recipe.warmup
        self.targets = recipe.targets
        self.boundaries: list[int] | None = None  # [s1, s1 + s2] in global steps, resolved at train start
        self.merged: list[str] = []  # sides folded into their factors at the stage-1 boundary (all at fit end)
        self._restored: dict | None = None
        self._stage: int | None = None  # stage of the current step (set at batch start)
        self._mode_before_fit: bool | None = None  # the model's training flag before fit (restored at its end)

    @property
    def scaling(self) -> float:
        return self.alpha / self.r

    @property
    def seed(self) -> int:
        """``lora.seed``, else the run's seed (``seed_everything`` sets ``PL_GLOBAL_SEED``), else 0."""
        if self.recipe.seed is not None:
            return self.recipe.seed
        return int(os.environ.get("PL_GLOBAL_SEED", 0))

    # -- structure: called from CompressionModule.configure_model, before any checkpoint loads -----
    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not already_compressed(pl_module):
            raise RuntimeError("UVLoRA found no compressed model: the recipe's low-rank stage must run first")
        model = pl_module.model
        self._train_mode(model)
        if lora_layers(model):
            return
        names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)
                 and (self.targets is None or any(name_matches(n, p) for p in self.targets))]
        if not names:
            raise ValueError(f"UVLoRA targets {self.targets!r} match no low-rank layer")
        from peft import LoraConfig, inject_adapter_in_model

        config = LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, bias="none",
                            target_modules=[f"{n}.{side}" for n in names for side in SIDES])
        with torch.random.fork_rng(devices=_cuda_devices()):  # peft draws lora_A from the global generator
            torch.manual_seed(self.seed)
            inject_adapter_in_model(config, model, adapter_name=ADAPTER)
        for name, p in pl_module.named_parameters():
            p.requires_grad_(".lora_" in name)
        counts = self.parameter_counts(pl_module)
        log.info("UVLoRA: adapters on %d low-rank layers (r=%d, alpha=%g); %d adapter params per side, %d frozen",
                 len(names), self.r, self.alpha, counts["down"], counts["frozen"])

    def _train_mode(self, model: nn.Module) -> None:
        """The whole model trains in train mode. A model loaded for inference (transformers' loaders return eval
        mode) would otherwise train with its own modules in eval mode and only the modules the compression added
        (factors, adapters) in train mode: its dropout and its ``gradient_checkpointing`` (both gated on
        ``training``) silently off, and Lightning warning of "modules in eval mode" at the start of training.
        Set here, before fit starts, so the model summary shows it too; the mode the model had comes back at the
        end of fit. The dense teacher of ``lora.distill`` (not a submodule) stays in eval mode."""
        if self._mode_before_fit is None:
            self._mode_before_fit = model.training
        model.train()
        log.info("UVLoRA: the model trains in train mode (it was in %s mode; restored at the end of fit)",
                 "train" if self._mode_before_fit else "eval")

    @staticmethod
    def parameter_counts(pl_module: LightningModule) -> dict[str, int]:
        counts = dict.fromkeys((*SIDES, "frozen"), 0)
        for name, p in pl_module.named_parameters():
            if ".lora_" in name:
                counts[name.split(".lora_")[0].rsplit(".", 1)[-1]] += p.numel()
            else:
                counts["frozen"] += p.numel()
        return counts

    # -- schedule ----------------------------------------------------------------------------------
    def stage_at(self, step: int) -> int:
        """1 or 2 while training, 3 once both stages are done."""
        assert self.boundaries is not None
        return 1 if step < self.boundaries[0] else 2 if step < self.boundaries[1] else 3

    def lr_factor(self, step: int) -> float:
        """Multiplier of the stage's learning rate at global ``step`` (1 with the constant schedule)."""
        if self.schedule == "constant":
            return 1.0
        assert self.boundaries is not None
        stage = self.stage_at(step)
        start = 0 if stage == 1 else self.boundaries[0]
        length = self.boundaries[stage - 1] - start
        return cosine_factor(math.ceil(self.warmup * length), length, step - start)

    def active_sides(self, step: int) -> tuple[str, ...]:
        """The factors trained at global ``step`` (none once both stages are done)."""
        stage = self.stage_at(step)
        return _sides(self.order[stage - 1]) if stage <= 2 else ()

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self.steps is not None:
            lengths = self.steps
        else:
            if not math.isfinite(trainer.num_training_batches):
                raise ValueError("UVLoRA epochs need a train loader with a length; give `steps` per stage instead")
            per_epoch = math.ceil(trainer.num_training_batches / trainer.accumulate_grad_batches)
            lengths = [e * per_epoch for e in self.epochs]
        boundaries = [lengths[0], lengths[0] + lengths[1]]
        if self._restored is not None and self._restored["boundaries"] != boundaries:
            raise ValueError(
                f"the checkpoint's UVLoRA stages end at steps {self._restored['boundaries']}, this run's at "
                f"{boundaries}; resume with the same steps/epochs (and train loader length)"
            )
        self.boundaries = boundaries
        if self._restored is None and trainer.global_step == 0:
            torch.manual_seed(self.seed + 1)  # the stage's own draws (dropout), whatever ran before it
        if self.schedule != "constant" and trainer.lr_scheduler_configs:
            raise ValueError(f"lora.schedule {self.schedule!r} sets the learning rate of every step itself; leave "
                             "the module's lr_schedule at 'constant' and give no --lr_scheduler (a second scheduler "
                             "would fight it)")
        if 0 <= trainer.max_steps < boundaries[1]:
            log.warning("trainer.max_steps=%d stops before UVLoRA stage 2 ends at step %d", trainer.max_steps,
                        boundaries[1])
        counts = self.parameter_counts(pl_module)
        trainable = sum(counts[side] for side in self.active_sides(trainer.global_step))
        for logger in trainer.loggers:
            logger.log_metrics({"lora/trainable_params": trainable, "lora/frozen_params": counts["frozen"]},
                               step=trainer.global_step)
        log.info("UVLoRA: stages end at steps %s (order %s); resuming at step %d in stage %d", boundaries,
                 self.order, trainer.global_step, self.stage_at(trainer.global_step))

    def on_train_batch_start(self, trainer: Trainer, pl_module: LightningModule, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step
        stage = self.stage_at(step)
        first = _sides(self.order[0])
        if stage >= 2 and not set(first) <= set(self.merged):
            n = 0
            for side in first:
                n += merge_side_(pl_module.model, side)
                self.merged.append(side)
                for p in self._side_params(pl_module, side):  # their moments are of no further use (or restart)
                    for opt in trainer.optimizers:
                        opt.state.pop(p, None)
            log.info("UVLoRA: stage 1 done at step %d; merged %d %s adapters into the factors", step, n,
                     self.order[0])
        if stage >= 3:
            trainer.should_stop = True
            return
        if self.schedule != "constant" or (self.learning_rate is not None and self._stage != stage):
            factor = self.lr_factor(step)
            for opt in trainer.optimizers:
                for group in opt.param_groups:
                    # the group's own rate, kept in the group (saved with the optimizer state on resume)
                    base = group.setdefault(_BASE_LR, group["lr"])
                    group["lr"] = factor * (base if self.learning_rate is None else self.learning_rate[stage - 1])
            if self.schedule != "constant":
                pl_module.log("lora/lr_factor", factor, on_step=True, on_epoch=False)
        self._stage = stage
        # logged at batch start: callbacks listed by the user run before this one and read it at batch end
        pl_module.log("lora/stage", float(stage), on_step=True, on_epoch=False)

    def on_before_optimizer_step(self, trainer: Trainer, pl_module: LightningModule, optimizer: Any) -> None:
        active = self.active_sides(trainer.global_step)
        for side in SIDES:
            if side not in active:
                for p in self._side_params(pl_module, side):
                    p.grad = None

    def on_train_batch_end(self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self.stage_at(trainer.global_step) >= 3:
            trainer.should_stop = True

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        n = merge_and_unwrap_lora_(pl_module.model)
        for p in pl_module.parameters():
            p.requires_grad_(False)
        self.merged = list(SIDES)
        if self._mode_before_fit is not None:
            pl_module.model.train(self._mode_before_fit)
        log.info("UVLoRA: merged %d adapters into the low-rank factors (ranks unchanged)", n)

    @staticmethod
    def _side_params(pl_module: LightningModule, side: str) -> list[nn.Parameter]:
        return [p for layer in lora_layers(pl_module.model, side).values()
                for p in (layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight)]

    # -- checkpoint --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"order": self.order, "boundaries": self.boundaries, "merged": list(self.merged),
                "r": self.r, "alpha": self.alpha}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = (state_dict.get("order"), state_dict.get("r"), state_dict.get("alpha"))
        if saved != (self.order, self.r, self.alpha):
            raise ValueError(f"the checkpoint's UVLoRA order/r/alpha {saved} differ from this run's "
                             f"{(self.order, self.r, self.alpha)}; resume with the same settings")
        self._restored = dict(state_dict)
        self.merged = list(state_dict.get("merged", []))

    def on_save_checkpoint(self, trainer: Trainer, pl_module: LightningModule, checkpoint: dict[str, Any]) -> None:
        if lora_layers(pl_module.model):  # read by CompressionModule to evaluate a mid-LoRA checkpoint
            checkpoint[CHECKPOINT_KEY] = {"scaling": self.scaling, "adapter": ADAPTER}


__all__ = ["UVLoRA", "fold_lora_state_dict_", "lora_layers", "merge_and_unwrap_lora_", "merge_side_"]
