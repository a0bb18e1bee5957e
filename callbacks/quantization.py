"""Quantization stage (QSVD / QuaRot): rotations, the Σ split β, then fake-quantized weights and activations.

Runs after :class:`~callbacks.truncation.SVDTruncation` (or alone, for rotation-only QuaRot), in
this order (:mod:`compression.rotation`, :mod:`compression.quant`):

1. ``rotate``: fold the norm scales into their readers and rotate the residual stream by a
   (randomized) Hadamard ``H1`` fused into the weights, plus the online Hadamard before each
   ``down_proj`` -- the float function is unchanged, the outliers are spread;
2. low-rank latents (every ``LowRankLinear`` and joint q/k/v group): with ``beta_search``, the
   exponent β that splits Σ between ``down = Σ^β Vᵀ`` and ``up = U Σ^(1-β)`` is chosen, then
   ``H2`` (a random orthogonal ``r x r`` rotation, ``latent_rotation``) is fused into each pair;
   without the search only ``H2``.  ``beta_objective`` says how β is chosen:

   - ``output``: per pair (or one global β), the quantized output error of the pair on captured
     calibration inputs -- cheap, but local: it ignores softmax, ``o_proj`` and upstream noise;
   - ``loss``: one global β, the calibration loss (the spec's ``training_loss``) of the whole
     model quantized at each candidate -- end to end, one quantized copy of the model per
     candidate (RTN stands in for GPTQ during the search);
3. every remaining ``nn.Linear`` (dense or factor) but the family's ``quant_exclude`` becomes a
   ``QuantLinear``: weights RTN with a per-row clipping search (or GPTQ with input Grams
   collected on the rotated model), activations fake-quantized per token.

Nothing here is random across processes: rotations are seeded and every rank reads the same
first calibration batches, so DDP ranks build identical weights.  The plan gains ``rotation``
and ``quantization`` sections, so a checkpoint rebuilds the structure without recalibration.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import get_state, plan_restored, spread_batches
from compression import ActQuantConfig, WeightQuantConfig, collect_stats, merge_plans, quantize_model_
from compression.beta_search import search_beta_by_loss_
from compression.plan import make_plan
from compression.quant import quantizable_linears
from compression.rotation import capture_inputs, lowrank_pairs, rotate_all_latents_, rotate_model_, search_beta_

log = logging.getLogger(__name__)


class Quantization(Callback):
    """Rotate, rebalance and fake-quantize the (compressed) model before training or evaluation.

    Args:
        weight_bits: weight bits (``None``: weights stay in float).
        act_bits: activation bits, per token (``None``: activations stay in float).
        weight_method: ``rtn`` (round-to-nearest with clipping search) or ``gptq``.
        symmetric: symmetric weight grid (asymmetric adds a zero point).
        group_size: weight group size along the inputs (``None``: one scale per output row).
        clip_grid: clipping-search grid (shrink step ``1/clip_grid``; 0 disables the search).
        act_clip_ratio: activations are clipped to this fraction of each token's range.
        rotate: fuse the residual-stream rotation ``H1`` and the online Hadamard (LLaMA-family
            language models); the model must support it.
        rotation_kind: ``random_hadamard``, ``hadamard`` or ``orthogonal``.
        latent_rotation: fuse ``H2`` into every low-rank pair.
        beta_search: choose β on calibration data (``False`` keeps the truncation's β).
        beta_objective: ``output`` (per-pair quantized output error) or ``loss`` (calibration loss of
            the quantized model, one global β); see the module docstring.
        betas: candidate β values.
        per_layer_beta: one β per pair (``True``) or one global β.
        calibration_tokens: tokens of captured inputs per pair for the β search.
        max_batches: calibration batches used for the β search / GPTQ Grams, evenly spaced over
            the calibration loader.
        seed: seed of ``H1`` and ``H2``.
    """

    def __init__(
        self,
        weight_bits: int | None = 4,
        act_bits: int | None = 4,
        weight_method: Literal["rtn", "gptq"] = "rtn",
        symmetric: bool = True,
        group_size: int | None = None,
        clip_grid: int = 100,
        act_clip_ratio: float = 0.9,
        rotate: bool = True,
        rotation_kind: Literal["random_hadamard", "hadamard", "orthogonal"] = "random_hadamard",
        latent_rotation: bool = True,
        beta_search: bool = True,
        beta_objective: Literal["output", "loss"] = "output",
        betas: list[float] | None = None,
        per_layer_beta: bool = True,
        calibration_tokens: int = 2048,
        max_batches: int | None = 8,
        seed: int = 0,
    ) -> None:
        if weight_bits is None and act_bits is None and not rotate:
            raise ValueError("Quantization with no weight_bits, no act_bits and rotate=False does nothing")
        if clip_grid < 0 or calibration_tokens < 1:
            raise ValueError("clip_grid must be >= 0 and calibration_tokens >= 1")
        self.weight = None if weight_bits is None else WeightQuantConfig(
            bits=weight_bits, symmetric=symmetric, group_size=group_size, clip=clip_grid > 0,
            grid=max(clip_grid, 1), method=weight_method)
        self.act = None if act_bits is None else ActQuantConfig(bits=act_bits, clip_ratio=act_clip_ratio)
        self.betas = list(betas) if betas is not None else [i / 10 for i in range(11)]
        if not self.betas or not all(0.0 <= b <= 1.0 for b in self.betas):
            raise ValueError(f"betas must be a non-empty list of values in [0, 1], got {betas}")
        self.rotate, self.rotation_kind, self.latent_rotation = rotate, rotation_kind, latent_rotation
        if beta_objective not in ("output", "loss"):
            raise ValueError(f"beta_objective must be 'output' or 'loss', got {beta_objective!r}")
        self.beta_search, self.beta_objective, self.per_layer_beta = beta_search, beta_objective, per_layer_beta
        self.calibration_tokens, self.max_batches, self.seed = calibration_tokens, max_batches, seed

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if plan_restored(pl_module):
            log.info("plan restored from a checkpoint; skipping quantization")
            return
        self._check_order(trainer, pl_module)
        model, spec, state = pl_module.model, pl_module.spec, get_state(pl_module)
        was_training = model.training
        model.eval()
        info: dict[str, Any] = {}
        with torch.no_grad():
            rotation = None
            if self.rotate:
                rotation = rotate_model_(model, spec.layout(model), kind=self.rotation_kind, seed=self.seed,
                                         online=True)
            pairs = lowrank_pairs(model)
            beta_from = float((pl_module.plan or {}).get("method", {}).get("beta", 0.5))
            if pairs and self.beta_search and self.beta_objective == "loss":
                info.update(self._beta_by_loss(trainer, pl_module, beta_from))
            elif pairs and self.beta_search:
                inputs = capture_inputs(model, list(pairs), self._batches(trainer), forward=spec.calibration_forward,
                                        max_tokens=self.calibration_tokens)
                chosen = search_beta_(model, inputs, self.weight, self.act, betas=self.betas, beta_from=beta_from,
                                      latent_seed=self.seed if self.latent_rotation else None,
                                      per_layer=self.per_layer_beta)
                info["beta"] = {name: c["beta"] for name, c in chosen.items()}
            elif pairs and self.latent_rotation:
                rotate_all_latents_(model, seed=self.seed)
            gptq = self.weight is not None and self.weight.method == "gptq"
            grams = self._grams(trainer, pl_module) if gptq else None
            entry = quantize_model_(model, self.weight, self.act, exclude=spec.quant_exclude(model), grams=grams)
        model.train(was_training)
        entry.update(info, latent_rotation=bool(pairs) and self.latent_rotation, seed=self.seed)
        step = make_plan({"name": "quantization"}, 0.0, "none", {}, quantization=entry, rotation=rotation)
        pl_module.plan = step if pl_module.plan is None else merge_plans(pl_module.plan, step)
        # merge_plans keeps the last plan's method; the truncation's method and ratio are what the plan means
        if state.report is not None:
            for key in ("method", "ratio", "allocation"):
                pl_module.plan[key] = state.report.plan[key] if key != "allocation" else state.allocation_name
        state.quantization = entry
        log.info("quantized %d layers (weights %s, activations %s, rotation %s)", len(entry["layers"]),
                 self.weight, self.act, "H1+online" if rotation else "none")

    def _beta_by_loss(self, trainer: Trainer, pl_module: LightningModule, beta_from: float) -> dict[str, Any]:
        """One global β: the candidate whose quantized model has the lowest mean calibration loss."""
        model, spec = pl_module.model, pl_module.spec
        found = search_beta_by_loss_(model, spec.training_loss, self._batches(trainer), self.weight, self.act,
                                     betas=self.betas, beta_from=beta_from,
                                     latent_seed=self.seed if self.latent_rotation else None,
                                     exclude=spec.quant_exclude(model))
        log.info("beta by calibration loss: %.2f (losses %s)", found["beta"], found["losses"])
        return {"beta": dict.fromkeys(lowrank_pairs(model), found["beta"]), "beta_losses": found["losses"]}

    def _check_order(self, trainer: Trainer, pl_module: LightningModule) -> None:
        from callbacks.lora import UVLoRA
        from callbacks.truncation import SVDTruncation

        names = [type(cb) for cb in trainer.callbacks]
        if UVLoRA in names:
            raise ValueError("Quantization and UVLoRA in one run is not supported: the LoRA stages train float "
                             "factors; recover in one run, export, then quantize the recovered model")
        if SVDTruncation in names and get_state(pl_module).report is None:
            raise RuntimeError("Quantization ran before SVDTruncation: list it after SVDTruncation")
        if pl_module.plan is not None and "quantization" in pl_module.plan:
            raise RuntimeError("the model is already quantized; use one Quantization callback")

    def _batches(self, trainer: Trainer) -> Iterator[Any]:
        """``max_batches`` calibration batches evenly spaced over the loader, the same on every rank."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise RuntimeError("Quantization needs a datamodule with a calibration_dataloader() method")
        for batch in spread_batches(dm.calibration_dataloader(), self.max_batches):
            yield trainer.strategy.batch_to_device(batch)

    def _grams(self, trainer: Trainer, pl_module: LightningModule):
        """Input Grams of every layer to quantize, on the rotated model (GPTQ)."""
        model = pl_module.model
        names = quantizable_linears(model, pl_module.spec.quant_exclude(model))
        stats = collect_stats(model, names, self._batches(trainer), forward=pl_module.spec.calibration_forward)
        return lambda name: stats[name].gram if name in stats else None
