"""The low-rank latent of a factor pair: the rotation H2, the Σ split β, and the β search on calibration inputs.

Latent rotation (H2).  A low-rank pair ``up (m x r)``, ``down (r x n)`` computes ``up · down``; with an
orthogonal ``R (r x r)``, ``down ← R down`` and ``up ← up Rᵀ`` leave the product unchanged and rotate the
latent ``z ← R z`` (r is arbitrary, so ``R`` is random orthogonal).

β.  The factors of an SVD split Σ as ``up = U Σ^(1-β)``, ``down = Σ^β Vᵀ T⁻¹``.  The columns of ``up`` are
orthogonal with norms ``σ^(1-β)``, so :func:`rebalance_` moves an existing pair from ``β0`` to any ``β``
(before H2) without redoing the SVD.  (Re-exported by :mod:`compression.rotation`.)
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from compression.hadamard import rotation_matrix
from compression.joint import LATENT_NAME, JointProjection
from compression.lowrank import LowRankLinear

log = logging.getLogger(__name__)


# -- low-rank latent: H2 and β -------------------------------------------------------------------
def lowrank_pairs(model: nn.Module) -> dict[str, tuple[nn.Linear, list[nn.Linear]]]:
    """``name -> (down, [ups])`` for every LowRankLinear and joint group (``<attn>.qkv_latent``)."""
    pairs: dict[str, tuple[nn.Linear, list[nn.Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            pairs[name] = (module.down, [module.up])
        latent = getattr(module, LATENT_NAME, None)
        if latent is not None:
            # the members may sit below the group's module (Gemma 4's q_proj.linear in its wrapper)
            ups = [c.up for c in module.modules() if isinstance(c, JointProjection) and c.latent is latent]
            pairs[f"{name}.{LATENT_NAME}" if name else LATENT_NAME] = (latent.down, ups)
    return pairs


@torch.no_grad()
def rotate_latent_(down: nn.Linear, ups: list[nn.Linear], r: torch.Tensor) -> None:
    """``down ← R down``, ``up ← up Rᵀ`` for orthogonal ``R (rank x rank)``: product unchanged, latent rotated."""
    r = r.double().to(down.weight.device)
    down.weight.copy_((r @ down.weight.double()).to(down.weight.dtype))
    for up in ups:
        up.weight.copy_((up.weight.double() @ r.T).to(up.weight.dtype))


def singular_values_from_up(ups: list[nn.Linear], beta: float) -> torch.Tensor:
    """``σ`` recovered from the column norms ``σ^(1-β)`` of the stacked up factors (valid before H2)."""
    if beta >= 1.0:
        raise ValueError("cannot recover σ from the up factors when beta = 1 (they are orthonormal)")
    norms = torch.cat([u.weight.detach().double() for u in ups], 0).norm(dim=0)
    return norms.pow(1.0 / (1.0 - beta))


@torch.no_grad()
def rebalance_(down: nn.Linear, ups: list[nn.Linear], beta_from: float, beta_to: float) -> None:
    """Move an SVD factor pair from ``Σ^β0`` in ``down`` to ``Σ^β`` (``up`` gets ``Σ^(1-β)``); product unchanged."""
    sigma = singular_values_from_up(ups, beta_from).clamp_min(torch.finfo(torch.float64).tiny)
    d = sigma.pow(beta_to - beta_from)
    down.weight.copy_((down.weight.double() * d[:, None]).to(down.weight.dtype))
    for up in ups:
        up.weight.copy_((up.weight.double() / d[None, :]).to(up.weight.dtype))


def rotate_all_latents_(model: nn.Module, seed: int = 0) -> dict[str, int]:
    """H2 on every low-rank pair (seed offset per pair); returns ``name -> rank``."""
    out = {}
    for i, (name, (down, ups)) in enumerate(lowrank_pairs(model).items()):
        rank = down.weight.shape[0]
        rotate_latent_(down, ups, rotation_matrix(rank, "orthogonal", seed + i))
        out[name] = rank
    return out


# -- β search on calibration inputs ---------------------------------------------------------------
@torch.no_grad()
def capture_inputs(model: nn.Module, names: Iterable[str], batches: Iterable,
                   forward: Callable[[nn.Module, object], object] | None = None,
                   max_tokens: int = 2048) -> dict[str, torch.Tensor]:
    """The first ``max_tokens`` input rows ``(N x n)`` (float32, CPU) seen by each named module."""
    store: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    seen = dict.fromkeys(store, 0)

    def hook(name):
        def fn(module, args):
            if seen[name] < max_tokens:
                x = args[0].detach().reshape(-1, args[0].shape[-1])[: max_tokens - seen[name]]
                store[name].append(x.float().cpu())
                seen[name] += x.shape[0]
        return fn

    handles = [model.get_submodule(n).register_forward_pre_hook(hook(n)) for n in store]
    try:
        for batch in batches:
            (forward or (lambda m, b: m(**b) if isinstance(b, dict) else m(b)))(model, batch)
            if all(v >= max_tokens for v in seen.values()):
                break
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v, 0) for n, v in store.items() if v}


def _pair_error(x, down, ups, refs, weight, act) -> float:
    from compression.quant import quantize_activation, quantize_weight_rtn

    dq = quantize_weight_rtn(down, weight) if weight is not None else down
    xq = quantize_activation(x, act) if act is not None else x
    z = xq @ dq.T
    z = quantize_activation(z, act) if act is not None else z
    err = 0.0
    for up, ref in zip(ups, refs):
        uq = quantize_weight_rtn(up, weight) if weight is not None else up
        err += float((z @ uq.T - ref).square().sum() / ref.square().sum().clamp_min(1e-30))
    return err


@torch.no_grad()
def search_beta_(model: nn.Module, inputs: dict[str, torch.Tensor], weight, act,
                 betas: Iterable[float] = tuple(i / 10 for i in range(11)), beta_from: float = 0.5,
                 latent_seed: int | None = 0, per_layer: bool = True) -> dict[str, dict]:
    """Choose β per low-rank pair (or one global β) by the quantized output error on calibration inputs.

    For each pair in :func:`lowrank_pairs` with captured inputs ``X`` (key = the pair name; for
    joint groups ``<attn>.qkv_latent``, for LowRankLinear its own name), and each β: rebalance the
    factors from ``beta_from``, apply the H2 rotation (``latent_seed`` not ``None``), fake-quantize
    the weights (RTN with ``weight``) and the input and latent activations (``act``), and measure
    ``Σ_outputs ‖Y_β - Y‖² / ‖Y‖²`` against the float low-rank outputs ``Y`` (β-invariant).
    The chosen β and H2 are then applied in place.  Returns ``name -> {"beta", "errors"}``.
    """
    betas = list(betas)
    pairs = {n: p for n, p in lowrank_pairs(model).items() if n in inputs}
    if not pairs:
        raise ValueError("search_beta_: no captured inputs match a low-rank pair "
                         f"(pairs: {list(lowrank_pairs(model))[:4]})")
    errors: dict[str, list[float]] = {}
    rotations: dict[str, torch.Tensor | None] = {}
    for i, (name, (down, ups)) in enumerate(pairs.items()):
        x = inputs[name].double().to(down.weight.device)
        d0, u0 = down.weight.double(), [u.weight.double() for u in ups]
        refs = [x @ (u @ d0).T for u in u0]
        sigma = singular_values_from_up(ups, beta_from).clamp_min(1e-300)
        rot = rotation_matrix(d0.shape[0], "orthogonal", latent_seed + i) if latent_seed is not None else None
        rotations[name] = rot
        errs = []
        for beta in betas:
            scale = sigma.pow(beta - beta_from)
            d, us = d0 * scale[:, None], [u / scale[None, :] for u in u0]
            if rot is not None:
                d, us = rot @ d, [u @ rot.T for u in us]
            errs.append(_pair_error(x, d, us, refs, weight, act))
        errors[name] = errs
    if per_layer:
        chosen = {n: betas[min(range(len(betas)), key=e.__getitem__)] for n, e in errors.items()}
    else:
        total = [sum(e[j] for e in errors.values()) for j in range(len(betas))]
        best = betas[min(range(len(betas)), key=total.__getitem__)]
        chosen = dict.fromkeys(errors, best)
    for name, (down, ups) in pairs.items():
        rebalance_(down, ups, beta_from, chosen[name])
        if rotations[name] is not None:
            rotate_latent_(down, ups, rotations[name])
    log.info("beta search: %s", {n: chosen[n] for n in list(chosen)[:4]})
    return {n: {"beta": chosen[n], "errors": errors[n]} for n in errors}
