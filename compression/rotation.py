"""QuaRot-style rotations fused into a LLaMA-family LM (or a VLM's), the latent rotation H2 and the Σ split β.

Residual stream (H1).  With row vectors, every block reads ``x`` through an RMSNorm and adds
its output back.  RMSNorm commutes with an orthogonal ``Q`` once its scale is gone:
``rms(xQ) = rms(x)`` so ``norm(xQ) = norm(x) Q`` when ``g = 1``.  Hence, in order:

1. fold each RMSNorm scale ``g`` into the layers that read it: ``W ← W diag(g)``, ``g ← 1``
   (input_layernorm -> q/k/v, post_attention_layernorm -> gate/up, final norm -> lm_head);
2. untie ``lm_head`` from the embeddings when tied: after folding, ``lm_head`` holds
   ``E diag(g)`` while the embedding holds ``E`` (both then rotated), so one shared matrix cannot
   serve both; the model gains ``vocab x E`` stored parameters (``lm_head`` stays in high precision);
3. rotate: embedding ``E ← E Q``; readers (q/k/v, gate/up, lm_head) ``W ← W Q``; writers (o_proj,
   down_proj) ``W ← Qᵀ W``, ``b ← Qᵀ b``.  The float function is unchanged; the residual stream
   now carries ``x Q``, whose outliers a random Hadamard ``Q`` spreads over all channels.

VLMs.  The decoder is found structurally (the module owning ``get_input_embeddings()`` as
``embed_tokens``, with ``layers`` and ``norm``; the head is ``get_output_embeddings()``).  In a
VLM the stream is also written by the projector, whose output replaces the image placeholder
embeddings, and (LLaVA-NeXT) by a learned ``image_newline`` vector, so those are rotated as
writers: projector output layer ``W ← Qᵀ W``, ``b ← Qᵀ b``; vector ``v ← v Q``
(:func:`stream_writers`).  The vision tower is untouched (it does not read the stream).

Online rotation before ``down_proj``: the MLP is replaced by :class:`HadamardMLP` (same child
names, so state-dict keys do not change), which feeds ``down_proj`` with ``a H`` (a Hadamard
transform, :class:`compression.hadamard.HadamardTransform`, also for 1536 = 12·128) and
``down_proj``'s input weights become ``W H``.

Latent rotation (H2).  A low-rank pair ``up (m x r)``, ``down (r x n)`` computes ``up · down``;
with an orthogonal ``R (r x r)``, ``down ← R down`` and ``up ← up Rᵀ`` leave the product unchanged
and rotate the latent ``z ← R z`` (r is arbitrary, so ``R`` is random orthogonal).

β.  The factors of an SVD split Σ as ``up = U Σ^(1-β)``, ``down = Σ^β Vᵀ T⁻¹``.  The columns of
``up`` are orthogonal with norms ``σ^(1-β)``, so :func:`rebalance_` moves an existing pair from
``β0`` to any ``β`` (before H2) without redoing the SVD.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from compression.hadamard import HadamardTransform, rotation_matrix
from compression.joint import LATENT_NAME, JointProjection
from compression.lowrank import LowRankLinear
from compression.residual import decoder_layers, language_model, language_model_module, output_head, stream_writers

log = logging.getLogger(__name__)


def input_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weight(s) that multiply ``module``'s input: Linear ``weight``, low-rank ``down``, joint latent ``down``."""
    if isinstance(module, LowRankLinear):
        return [module.down.weight]
    if isinstance(module, JointProjection):
        return [module.latent.down.weight]
    if isinstance(module, nn.Linear):
        return [module.weight]
    raise TypeError(f"cannot rotate the input of a {type(module).__name__}")


def output_params(module: nn.Module) -> list[nn.Parameter]:
    """Weight (``out x ·``) and bias that produce ``module``'s output (the ``up`` factor when low-rank)."""
    lin = module.up if isinstance(module, (LowRankLinear, JointProjection)) else module
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"cannot rotate the output of a {type(module).__name__}")
    return [lin.weight] + ([lin.bias] if lin.bias is not None else [])


@torch.no_grad()
def _right_(params: Iterable[nn.Parameter], mat: torch.Tensor) -> None:
    """``W ← W M`` once per distinct parameter (q/k/v sharing one latent are rotated once)."""
    seen = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.copy_((p.double() @ mat.to(p.device)).to(p.dtype))


@torch.no_grad()
def _left_(params: Iterable[nn.Parameter], mat: torch.Tensor) -> None:
    """``W ← Mᵀ W`` (and ``b ← Mᵀ b``)."""
    for p in params:
        p.copy_((mat.to(p.device).T @ p.double()).to(p.dtype))


def _config_untie_(model: nn.Module) -> None:
    """Record the untied head in every config the model (and its sub-models) carry."""
    configs = [getattr(m, "config", None) for m in model.modules()]
    text = getattr(getattr(model, "config", None), "get_text_config", None)
    configs.append(text() if callable(text) else None)
    for config in configs:
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False


def untie_lm_head_(model: nn.Module) -> bool:
    """Give ``lm_head`` its own weight when it is tied to the input embedding; returns whether it was tied."""
    emb, head = language_model_module(model).embed_tokens, output_head(model)
    if getattr(head, "weight", None) is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone())
    _config_untie_(model)
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    log.info("untied lm_head from the input embedding (+%d stored parameters)", head.weight.numel())
    return True


def _attn_readers(layer: nn.Module) -> list[nn.Module]:
    return [layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]


def _mlp_readers(layer: nn.Module) -> list[nn.Module]:
    return [layer.mlp.gate_proj, layer.mlp.up_proj]


@torch.no_grad()
def fold_norms_(model: nn.Module) -> None:
    """Fold every RMSNorm scale into the layers that read it and set the scales to 1 (function unchanged)."""
    untie_lm_head_(model)
    pairs = []
    for layer in decoder_layers(model):
        pairs += [(layer.input_layernorm, _attn_readers(layer)), (layer.post_attention_layernorm, _mlp_readers(layer))]
    pairs.append((language_model_module(model).norm, [output_head(model)]))
    for norm, readers in pairs:
        g = norm.weight.detach().double()
        _right_([p for r in readers for p in input_weights(r)], torch.diag(g))
        norm.weight.fill_(1.0)


@torch.no_grad()
def rotate_residual_(model: nn.Module, q: torch.Tensor, writers: dict[str, list[str]] | None = None) -> None:
    """Rotate the residual stream by orthogonal ``q (E x E)`` (norms must be folded first).

    ``writers``: what else writes into the stream (:func:`stream_writers`, the default): their
    outputs are rotated like the blocks' (``W ← Qᵀ W``, ``b ← Qᵀ b``; vectors ``v ← v Q``).
    """
    base, head = language_model_module(model), output_head(model)
    norms = [base.norm]
    for la in decoder_layers(model):
        norms += [la.input_layernorm, la.post_attention_layernorm]
    if any(not torch.all(n.weight == 1) for n in norms):
        raise ValueError("rotate_residual_: RMSNorm scales are not folded; call fold_norms_ first")
    if getattr(head, "weight", None) is base.embed_tokens.weight:
        raise ValueError("rotate_residual_: lm_head is tied to the embedding; call fold_norms_ (it unties) first")
    writers = stream_writers(model) if writers is None else writers
    q = q.double()
    emb = base.embed_tokens.weight
    emb.copy_((emb.double() @ q.to(emb.device)).to(emb.dtype))
    for layer in decoder_layers(model):
        _right_([p for r in _attn_readers(layer) + _mlp_readers(layer) for p in input_weights(r)], q)
        _left_(output_params(layer.self_attn.o_proj) + output_params(layer.mlp.down_proj), q)
    _right_(input_weights(head), q)
    for name in writers.get("linears", []):
        _left_(output_params(model.get_submodule(name)), q)
    for name in writers.get("vectors", []):
        vec = model.get_parameter(name)
        vec.copy_((vec.double() @ q.to(vec.device)).to(vec.dtype))


class HadamardMLP(nn.Module):
    """Gated MLP ``down(H(act(gate(x)) * up(x)))`` with an online Hadamard ``H`` (same child names as LlamaMLP)."""

    def __init__(self, mlp: nn.Module) -> None:
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = mlp.gate_proj, mlp.up_proj, mlp.down_proj
        self.act_fn = mlp.act_fn
        self.hadamard = HadamardTransform(mlp.down_proj.in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.hadamard(self.act_fn(self.gate_proj(x)) * self.up_proj(x)))


def install_online_hadamard_(model: nn.Module, fuse: bool = True) -> int:
    """Wrap every MLP in :class:`HadamardMLP`; with ``fuse`` also set ``down_proj``'s input weights to ``W H``."""
    count = 0
    for layer in decoder_layers(model):
        if isinstance(layer.mlp, HadamardMLP):
            continue
        new = HadamardMLP(layer.mlp).to(next(layer.mlp.parameters()).device)
        if fuse:
            _right_(input_weights(new.down_proj), new.hadamard.matrix())
        layer.mlp = new
        count += 1
    return count


def rotate_model_(model: nn.Module, kind: str = "random_hadamard", seed: int = 0, online: bool = True,
                  writers: dict[str, list[str]] | None = None) -> dict:
    """Fold norms, untie, rotate the residual stream by H1 and (``online``) add the Hadamard before
    ``down_proj``.  Works on dense, low-rank and joint-QKV layers, on causal LMs and on the language
    model of a VLM (whose projector output is rotated too: ``writers``, see :func:`stream_writers`).
    Returns the plan's ``rotation`` entry."""
    from compression.quant import QuantLinear

    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("rotate_model_: the model is already quantized; rotate before quantize_model_")
    hidden = language_model_module(model).embed_tokens.weight.shape[1]
    writers = stream_writers(model) if writers is None else writers  # before untying: the head is found by identity
    fold_norms_(model)
    rotate_residual_(model, rotation_matrix(hidden, kind, seed), writers)
    if online:
        install_online_hadamard_(model)
    entry = {"residual": {"kind": kind, "seed": seed, "size": hidden}, "online_down_proj": online, "untied": True}
    if any(writers.values()):
        entry["stream_writers"] = {k: list(v) for k, v in writers.items()}
    return entry


def apply_rotation_plan(model: nn.Module, entry: dict) -> list[str]:
    """Rebuild the structure of :func:`rotate_model_` (untied head, Hadamard MLPs) without touching weights."""
    changed = []
    if entry.get("untied") and untie_lm_head_(model):
        changed.append(next(n for n, m in model.named_modules() if m is output_head(model)))
    if entry.get("online_down_proj"):
        lm_name, _ = language_model(model)
        prefix = f"{lm_name}." if lm_name else ""
        for i, layer in enumerate(decoder_layers(model)):
            if not isinstance(layer.mlp, HadamardMLP):
                layer.mlp = HadamardMLP(layer.mlp)
                changed.append(f"{prefix}layers.{i}.mlp")
    return changed


# -- low-rank latent: H2 and β -------------------------------------------------------------------
def lowrank_pairs(model: nn.Module) -> dict[str, tuple[nn.Linear, list[nn.Linear]]]:
    """``name -> (down, [ups])`` for every LowRankLinear and joint group (``<attn>.qkv_latent``)."""
    pairs: dict[str, tuple[nn.Linear, list[nn.Linear]]] = {}
    for name, module in model.named_modules():
        if isinstance(module, LowRankLinear):
            pairs[name] = (module.down, [module.up])
        latent = getattr(module, LATENT_NAME, None)
        if latent is not None:
            ups = [c.up for c in module.children() if isinstance(c, JointProjection) and c.latent is latent]
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
