"""β by the end-to-end calibration loss: one global Σ split chosen on the quantized model.

Every low-rank pair (``LowRankLinear`` or joint q/k/v group) stores ``up = U Σ^(1-β)`` and
``down = Σ^β Vᵀ T⁻¹``; β moves precision between the two factors once both are quantized.
:func:`compression.rotation.search_beta_` picks β per pair by the pair's own quantized output
error, which is cheap but local (no softmax, ``o_proj``, or noise from the quantized layers
upstream).  :func:`search_beta_by_loss_` instead quantizes a copy of the whole model at every
candidate β (with the latent rotation H2 fused as it will be) and keeps the β with the lowest
mean calibration loss -- the criterion a user finally cares about, on calibration data only.
Cost: one model copy and one quantization + loss evaluation per candidate.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Sequence

import torch
from torch import nn

from compression.hadamard import rotation_matrix
from compression.quant import ActQuantConfig, WeightQuantConfig, quantize_model_
from compression.rotation import lowrank_pairs, rebalance_, rotate_latent_

log = logging.getLogger(__name__)


@torch.no_grad()
def set_beta_(model: nn.Module, beta_from: float, beta: float, latent_seed: int | None = 0) -> list[str]:
    """Move every low-rank pair from ``beta_from`` to ``beta``, then fuse H2 (pair ``i`` seeded
    ``latent_seed + i``, as :func:`compression.rotation.search_beta_` does); ``None``: no H2."""
    names = []
    for i, (name, (down, ups)) in enumerate(lowrank_pairs(model).items()):
        rebalance_(down, ups, beta_from, beta)
        if latent_seed is not None:
            rotate_latent_(down, ups, rotation_matrix(down.weight.shape[0], "orthogonal", latent_seed + i))
        names.append(name)
    return names


@torch.no_grad()
def search_beta_by_loss_(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, object], torch.Tensor],
    batches: Iterable,
    weight: WeightQuantConfig | None,
    act: ActQuantConfig | None,
    betas: Sequence[float] = tuple(i / 10 for i in range(11)),
    beta_from: float = 0.5,
    latent_seed: int | None = 0,
    exclude: Iterable[str] | None = None,
) -> dict:
    """Choose one global β by the quantized model's mean calibration loss and apply it (with H2) in place.

    The model itself is left unquantized (quantize it afterwards with the same configs).  GPTQ
    weights are scored with RTN during the search.  Returns ``{"beta", "losses": {β: loss}}``.
    """
    if not lowrank_pairs(model):
        raise ValueError("search_beta_by_loss_: the model has no low-rank pair (compress it first)")
    batches = list(batches)
    if not batches:
        raise ValueError("search_beta_by_loss_: no calibration batches")
    if weight is not None and weight.method != "rtn":
        weight = WeightQuantConfig(**{**weight.__dict__, "method": "rtn"})
    exclude = None if exclude is None else list(exclude)  # None: quantize_model_'s default (the output head)
    losses = []
    for beta in betas:
        trial = copy.deepcopy(model)
        set_beta_(trial, beta_from, beta, latent_seed)
        quantize_model_(trial, weight, act, exclude=exclude)
        losses.append(sum(float(loss_fn(trial, b)) for b in batches) / len(batches))
        del trial
        log.info("beta %.2f: calibration loss %.5f", beta, losses[-1])
    finite = [i for i, v in enumerate(losses) if math.isfinite(v)]
    if not finite:
        raise FloatingPointError("every beta candidate gave a non-finite calibration loss after quantization")
    best = betas[min(finite, key=losses.__getitem__)]
    set_beta_(model, beta_from, best, latent_seed)
    return {"beta": best, "losses": {str(b): v for b, v in zip(betas, losses)}}
