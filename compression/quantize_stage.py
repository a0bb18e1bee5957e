"""The quantization stage of a recipe (QSVD / QuaRot): rotations, the Σ split β, fake quantization.

In this order (:mod:`compression.rotation`, :mod:`compression.beta_search`, :mod:`compression.quant`):

1. ``rotate``: fold the norm scales into their readers and rotate the residual stream by a
   (randomized) Hadamard ``H1`` fused into the weights, plus the online Hadamard before each
   ``down_proj`` -- the float function is unchanged, the outliers are spread.  With calibration
   batches, that is checked: the output head's rows on the first batch before and after must agree
   (:func:`check_rotation`), else the run stops (a layout that misses part of a family's blocks);
2. low-rank latents (every ``LowRankLinear`` and joint q/k/v group): with ``beta_search`` the
   exponent β splitting Σ between ``down = Σ^β Vᵀ`` and ``up = U Σ^(1-β)`` is chosen, then ``H2``
   (a random orthogonal ``r x r`` rotation, ``latent_rotation``) is fused into each pair; without
   the search only ``H2``.  ``beta_objective``:

   - ``output``: per pair (or one global β), the quantized output error of the pair on captured
     calibration inputs -- cheap, but local: it ignores softmax, ``o_proj`` and upstream noise;
   - ``loss``: one global β, the calibration loss of the whole model quantized at each candidate
     (RTN stands in for GPTQ during the search);
3. every remaining ``nn.Linear`` (dense or factor) but the family's ``quant_exclude`` becomes a
   ``QuantLinear``: weights RTN with a per-row clipping search (or GPTQ with input Grams collected
   on the rotated model), activations fake-quantized per token.

Nothing here is random across processes: rotations are seeded and the batches are the caller's
(the same on every rank), so DDP ranks build identical weights.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn

from compression.collector import collect_stats
from compression.quant import ActQuantConfig, WeightQuantConfig, quantizable_linears, quantize_model_
from compression.recipe import QuantRecipe

log = logging.getLogger(__name__)


ROTATION_CHECK_ROWS = 64
"""Rows of the output head's output (token positions) compared before and after the rotation."""


def rotation_tolerance(dtype: torch.dtype) -> float:
    """The largest relative output change a correct rotation leaves in a model of ``dtype``: float rounding of the
    rotated weights (float64 1e-6, float32 1e-3, half precisions 0.1).  A layout that misses a norm, a scale or a
    reader of the residual stream changes the output by 0.6-0.8 (HyperCLOVAX's post-norms, Jais 2's LayerNorm)."""
    return {torch.float64: 1e-6, torch.float32: 1e-3}.get(dtype, 0.1)


class _HeadReached(Exception):
    """Raised by :func:`head_rows`' hook: the forward ends at the head, whose input it has."""


@torch.no_grad()
def head_rows(model: nn.Module, layout: Any, batch: Any, forward: Callable | None) -> torch.Tensor | None:
    """The output head (``layout.head``) applied to the first :data:`ROTATION_CHECK_ROWS` rows of its input on
    ``batch``, in float32; ``None`` when the head did not run.  The forward stops at the head: the whole batch's
    logits (gigabytes for a 128k vocabulary) are never formed."""
    from compression.collector import default_forward

    head = model.get_submodule(layout.head)
    rows: list[torch.Tensor] = []

    def keep(module: nn.Module, args: tuple) -> None:
        rows.append(args[0].detach().reshape(-1, args[0].shape[-1])[:ROTATION_CHECK_ROWS])
        raise _HeadReached

    handle = head.register_forward_pre_hook(keep)
    try:
        (forward or default_forward)(model, batch)
    except _HeadReached:
        pass
    finally:
        handle.remove()
    if not rows:
        return None
    out = head(rows[0])
    return (out[0] if isinstance(out, tuple) else out).float()


def check_rotation(model: nn.Module, layout: Any, before: torch.Tensor, after: torch.Tensor | None) -> None:
    """Stop the run when the rotation changed the model's function: the output head's rows on the first calibration
    batch must agree within :func:`rotation_tolerance` (relative, Frobenius)."""
    if after is None:
        return
    err = float((after - before).norm() / before.norm().clamp_min(1e-30))
    dtype = next(model.parameters()).dtype
    tolerance = rotation_tolerance(dtype)
    if not err <= tolerance:
        raise RuntimeError(
            f"{layout.model_class}: rotating the residual stream changed the model's output by {err:.2e} (relative, "
            f"head output on the first calibration batch; a correct rotation stays within "
            f"{tolerance:g} in {dtype}). The model layout ({layout.family}) does not describe "
            "something this model computes (a norm, a scale, a reader of the stream, a config option); the run "
            "stops before quantizing. Set quantization.rotate: false to quantize without rotation, and report the "
            "model class and config")


def quant_configs(q: QuantRecipe) -> tuple[WeightQuantConfig | None, ActQuantConfig | None]:
    weight = None if q.weight_bits is None else WeightQuantConfig(
        bits=q.weight_bits, symmetric=q.symmetric, group_size=q.group_size, clip=q.clip_grid > 0,
        grid=max(q.clip_grid, 1), method=q.weight_method)
    act = None if q.act_bits is None else ActQuantConfig(bits=q.act_bits, clip_ratio=q.act_clip_ratio)
    return weight, act


@torch.no_grad()
def run_quantization(model: nn.Module, q: QuantRecipe, family: Any, batches: Callable[[], Iterable] | None,
                     beta_from: float) -> tuple[dict | None, dict | None]:
    """Apply ``q`` to ``model`` in place; returns the plan's ``(rotation, quantization)`` sections."""
    from compression.beta_search import search_beta_by_loss_
    from compression.latent_rotation import capture_inputs, lowrank_pairs, rotate_all_latents_, search_beta_
    from compression.rotation import rotate_model_

    weight, act = quant_configs(q)
    forward = getattr(family, "calibration_forward", None)
    exclude_hook = getattr(family, "quant_exclude", None)
    exclude = exclude_hook(model) if exclude_hook is not None else []
    was_training = model.training
    model.eval()
    info: dict[str, Any] = {}
    try:
        rotation = None
        if q.rotate:
            layout_of = getattr(family, "layout", None)
            layout = layout_of(model) if layout_of is not None else None
            if layout is None:
                raise ValueError(f"quantization.rotate needs the model's layout (where its residual stream is "
                                 f"written and read); the family of {type(model).__name__} gives none")
            batch = next(iter(batches()), None) if batches is not None else None
            before = head_rows(model, layout, batch, forward) if batch is not None else None
            rotation = rotate_model_(model, layout, kind=q.rotation_kind, seed=q.seed, online=True)
            if before is not None:
                check_rotation(model, layout, before, head_rows(model, layout, batch, forward))
        pairs = lowrank_pairs(model)
        latent_seed = q.seed if q.latent_rotation else None
        if pairs and q.beta_search and q.beta_objective == "loss":
            loss = getattr(family, "training_loss", None)
            if loss is None:
                raise ValueError("beta_objective: loss needs the family's training_loss")
            found = search_beta_by_loss_(model, loss, batches(), weight, act, betas=q.betas, beta_from=beta_from,
                                         latent_seed=latent_seed, exclude=exclude)
            log.info("beta by calibration loss: %.2f (losses %s)", found["beta"], found["losses"])
            info["beta"] = dict.fromkeys(pairs, found["beta"])
            info["beta_losses"] = found["losses"]
        elif pairs and q.beta_search:
            inputs = capture_inputs(model, list(pairs), batches(), forward=forward, max_tokens=q.calibration_tokens)
            chosen = search_beta_(model, inputs, weight, act, betas=q.betas, beta_from=beta_from,
                                  latent_seed=latent_seed, per_layer=q.per_layer_beta)
            info["beta"] = {name: c["beta"] for name, c in chosen.items()}
        elif pairs and q.latent_rotation:
            rotate_all_latents_(model, seed=q.seed)
        entry = None
        if weight is not None or act is not None:
            grams = None
            if weight is not None and weight.method == "gptq":
                names = quantizable_linears(model, exclude)
                stats = collect_stats(model, names, batches(), forward=forward)
                grams = lambda name: stats[name].gram if name in stats else None  # noqa: E731
            entry = quantize_model_(model, weight, act, exclude=exclude, grams=grams)
            entry.update(info, latent_rotation=bool(pairs) and q.latent_rotation, seed=q.seed)
            log.info("quantized %d layers (weights %s, activations %s, rotation %s)", len(entry["layers"]), weight,
                     act, "H1+online" if rotation else "none")
    finally:
        model.train(was_training)
    return rotation, entry
