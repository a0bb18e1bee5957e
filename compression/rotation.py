"""QuaRot-style rotations fused into a decoder described by its layout, the latent rotation H2 and the Σ split β.

Residual stream (H1).  With row vectors, every block reads the stream ``x`` through a norm and adds its
output back.  An RMSNorm commutes with an orthogonal ``Q`` once its scale is gone: ``rms(xQ) = rms(x)``, so
``norm(xQ) = norm(x) Q`` when the scale is 1.  Hence, in order (every module named by the
:class:`~compression.layout.ModelLayout`, never here):

1. fold each reader norm's scale ``s = offset + w`` (LLaMA ``w``, Gemma ``1 + w``) into the layers that read
   it: ``W ← W diag(s)``, then ``w ← 1 - offset`` (scale 1);
2. untie the head from the token embedding when tied: after folding the head holds ``E diag(s)`` while the
   embedding holds ``E`` (both then rotated), so one shared matrix cannot serve both (``+vocab x E`` stored);
3. rotate: token embedding ``E ← E Q`` (a constant embedding scale commutes); readers (q/k/v or fused qkv,
   the MLP inputs, a MoE router and its experts' ``gate_up``, the head) ``W ← W Q``; writers (attention and MLP
   output projections, experts' ``down``, a VLM projector's output layer) ``W ← Qᵀ W``, ``b ← Qᵀ b``;
   learned stream vectors ``v ← v Q``.
The float function is unchanged (float64: to rounding); the stream now carries ``x Q``, whose outliers a
random Hadamard ``Q`` spreads over all channels.  Blocks without reader norms (OLMo 2: post-norms only) are
rotated this way too, with nothing to fold but the final norm.

Post-norm layouts (Gemma: ``stream += norm_g(o_proj(...))``) are rotated at the *readers* instead: a post-norm's
scale acts after normalization and cannot be folded, so a rotated stream would need ``Q`` online after every
post-norm anyway; the same number of online transforms is placed after every *reader* norm
(:class:`RotatedOutput`: ``norm_s(x) ↦ norm_s(x) Q``, ``diag(signs)`` then a fast Hadamard for a randomized
Hadamard ``Q``) and the readers become ``W ← W Q``.  Every norm keeps its scale; the stream, the embedding,
the writers and the head are untouched (no untied head).  Folding is not merely unnecessary there but harmful:
Gemma-3-270M's stream carries massive channels in every token (57-97% of a reader's normalized input energy in
its top 2 channels) which its reader norms drop (``1 + w = 0`` on the top channel of each
``pre_feedforward_layernorm`` measured, 0.3-1.7 in ``input_layernorm`` whose median scale is 3.5-30).
Folded, ``W diag(s)`` is (nearly) orthogonal to that energy only in float: rotated, the quantization error of
every column meets the massive input, and W4 RTN readers' output error reaches up to 5.4x their output
(at most 0.35x unfolded); docs/results/second_llm.md.

LayerNorm layouts (StarCoder2, Cohere, Phi-3.5-MoE, GPT-2, GPT-NeoX, Falcon) and parallel blocks are rotated at the
readers as well (:func:`default_site`): a LayerNorm subtracts the channel mean, and ``mean(xQ) != mean(x) Q``, so a
rotated stream would not commute with it, while at the readers the norm (weight and bias) runs on the unrotated
stream and only its output turns.  One norm feeding both halves of a parallel block is wrapped once.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

import torch
from torch import nn

from compression.forms import LinearExperts
from compression.hadamard import HadamardTransform, rotation_matrix
from compression.joint import JointProjection
from compression.latent_rotation import (  # noqa: F401  (re-exported: callers import them from here)
    capture_inputs,
    lowrank_pairs,
    rebalance_,
    rotate_all_latents_,
    rotate_latent_,
    search_beta_,
    singular_values_from_up,
)
from compression.layout import MLP, ModelLayout, Norm
from compression.lowrank import LowRankLinear
from compression.rotation_modules import (  # noqa: F401  (re-exported: callers import them from here)
    HadamardAfterAct,
    HadamardMLP,
    RotatedOutput,
    SignedHadamard,
    StreamRotation,
)

log = logging.getLogger(__name__)


def input_weights(module: nn.Module) -> list[nn.Parameter]:
    """The weight(s) (``· x in``) that multiply ``module``'s input: Linear ``weight``, low-rank ``down``, joint
    latent ``down``, or the ``weight`` of a module applying ``F.linear`` (a MoE router)."""
    if isinstance(module, LowRankLinear):
        return [module.down.weight]
    if isinstance(module, JointProjection):
        return [module.latent.down.weight]
    if type(module).__name__ == "Conv1D":  # weight stored in x out: ``W Q`` would rotate its output
        raise TypeError("cannot rotate the input of a Conv1D (its weight is stored in x out); convert it to "
                        "nn.Linear first (compression.forms.linearize_)")
    weight = getattr(module, "weight", None)
    if isinstance(weight, nn.Parameter) and weight.dim() == 2:
        return [weight]
    raise TypeError(f"cannot rotate the input of a {type(module).__name__}")


def output_params(module: nn.Module) -> list[nn.Parameter]:
    """Weight (``out x ·``) and bias that produce ``module``'s output (the ``up`` factor when low-rank)."""
    lin = module.up if isinstance(module, (LowRankLinear, JointProjection)) else module
    if not isinstance(lin, nn.Linear):
        raise TypeError(f"cannot rotate the output of a {type(module).__name__}")
    return [lin.weight] + ([lin.bias] if lin.bias is not None else [])


@torch.no_grad()
def _right_(params: Iterable[nn.Parameter], mat: torch.Tensor) -> None:
    """``W ← W M`` on the last axis, once per distinct parameter (q/k/v sharing one latent are rotated once)."""
    seen = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        p.copy_((p.double() @ mat.to(p.device)).to(p.dtype))


@torch.no_grad()
def _left_(params: Iterable[nn.Parameter], mat: torch.Tensor) -> None:
    """``W ← Mᵀ W`` on the output axis (``-2`` of a matrix or 3-D expert tensor, ``-1`` of a bias)."""
    for p in params:
        m = mat.to(p.device).T
        p.copy_((m @ p.double() if p.dim() > 1 else p.double() @ m.T).to(p.dtype))


# -- what the layout says reads and writes the stream ------------------------------------------------
def _mlp_readers(model: nn.Module, mlp: MLP) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(input weights, output params)`` of an MLP: its readers' input weights and its writers' outputs."""
    ins, outs = [], []
    for name in mlp.readers:
        ins += input_weights(model.get_submodule(name))
    if mlp.writer is not None:
        outs += output_params(model.get_submodule(mlp.writer))
    if mlp.experts is not None:
        spec = mlp.experts
        ins += input_weights(model.get_submodule(spec.router))
        experts = model.get_submodule(spec.path)
        if isinstance(experts, LinearExperts):
            for lin in getattr(experts, spec.down):
                outs += output_params(lin)
        elif spec.form != "mixtral":
            raise NotImplementedError(f"{spec.path}: {spec.form} experts are rotated as per-expert linears; "
                                      "convert them first (compression.forms.linearize_)")
        else:
            ins.append(getattr(experts, spec.gate_up))    # n x 2I x E: rotate the last axis
            outs.append(getattr(experts, spec.down))      # n x E x I: rotate axis -2
    if mlp.shared is not None:
        sin, sout = _mlp_readers(model, mlp.shared)
        ins, outs = ins + sin, outs + sout
    if mlp.shared_gate is not None:
        ins += input_weights(model.get_submodule(mlp.shared_gate))
    return ins, outs


def _reader_groups(model: nn.Module, layout: ModelLayout) -> list[tuple[Norm | None, list[nn.Parameter]]]:
    """``(reader norm, input weights of every layer reading its output)`` for every block, in order.  A norm that
    feeds both the attention and the MLP (``mlp_norm=None`` with a reader ``attn_norm``: Falcon's and Cohere's
    parallel blocks) is one group; blocks with no reader norms (post-norm only) give ``(None, readers)``.  Raises
    ``TypeError`` for a reader it cannot rotate (callers call it before changing anything)."""
    groups = []
    for b in layout.blocks:
        attn_in = [p for r in b.attn.readers for p in input_weights(model.get_submodule(r))]
        mlp_in = _mlp_readers(model, b.mlp)[0]
        if b.attn_norm is not None and b.mlp_norm is None:
            groups.append((b.attn_norm, attn_in + mlp_in))
        else:
            groups += [(b.attn_norm, attn_in), (b.mlp_norm, mlp_in)]
    return groups


def default_site(layout: ModelLayout) -> str:
    """``"stream"`` for pre-norm RMSNorm decoders and for blocks without reader norms; ``"readers"`` where a reader
    norm's scale must stay (post-norm layouts, Gemma), where a norm subtracts the mean (LayerNorm) or where one
    norm feeds a parallel block."""
    if any(b.attn_norm is None for b in layout.blocks):
        return "stream"
    norms = [layout.final_norm] + [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm) if n is not None]
    if _post_norms(layout) or any(n.kind != "rms" for n in norms) or any(b.parallel or b.mlp_norm is None
                                                                         for b in layout.blocks):
        return "readers"
    return "stream"


def _check_rotatable(layout: ModelLayout, site: str = "stream") -> None:
    layout.require("rotation")
    if site == "readers":
        bare = [b.path for b in layout.blocks if b.attn_norm is None]
        if bare:
            raise NotImplementedError(f"{layout.model_class}: the reader-side rotation rides on the reader norms' "
                                      f"outputs and {bare[0]} has none; rotate the stream (site='stream')")
        return
    norms = [layout.final_norm] + [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm, b.attn_out_norm,
                                                                      b.mlp_out_norm) if n is not None]
    bad = [n.path for n in norms if n.kind != "rms"]
    if bad:
        raise NotImplementedError(f"{layout.model_class}: the stream rotation needs RMSNorm everywhere; {bad[0]} is a "
                                  "LayerNorm, whose mean subtraction does not commute with a rotation; rotate at "
                                  "the readers (site='readers', the default for LayerNorm layouts)")
    if any(b.parallel or (b.attn_norm is not None and b.mlp_norm is None) for b in layout.blocks):
        raise NotImplementedError(f"{layout.model_class}: the stream rotation of parallel blocks is not implemented; "
                                  "rotate at the readers (site='readers', the default for them)")


def _scale_identity(norm: nn.Module, spec: Norm) -> bool:
    if getattr(norm, "weight", None) is None:
        return spec.offset == 0  # a norm without a scale
    return bool(torch.all(norm.weight + spec.offset == 1))


def untie_lm_head_(model: nn.Module, layout: ModelLayout) -> bool:
    """Give the head its own weight when it is tied to the token embedding; returns whether it was tied."""
    emb, head = model.get_submodule(layout.token_embedding), model.get_submodule(layout.head)
    if getattr(head, "weight", None) is not emb.weight:
        return False
    head.weight = nn.Parameter(emb.weight.detach().clone())
    configs = [getattr(m, "config", None) for m in model.modules()]
    text = getattr(getattr(model, "config", None), "get_text_config", None)
    configs.append(text() if callable(text) else None)
    for config in configs:
        if config is not None and hasattr(config, "tie_word_embeddings"):
            config.tie_word_embeddings = False
    if hasattr(model, "_tied_weights_keys"):
        model._tied_weights_keys = None
    log.info("untied %s from the input embedding (+%d stored parameters)", layout.head, head.weight.numel())
    return True


@torch.no_grad()
def fold_norms_(model: nn.Module, layout: ModelLayout) -> None:
    """Fold every reader norm's scale into the layers that read it; set the scales to 1 (function unchanged)."""
    _check_rotatable(layout)
    untie_lm_head_(model, layout)
    pairs = [(norm, readers) for norm, readers in _reader_groups(model, layout) if norm is not None]
    pairs.append((layout.final_norm, input_weights(model.get_submodule(layout.head))))
    for spec, readers in pairs:
        norm = model.get_submodule(spec.path)
        if _scale_identity(norm, spec):
            continue  # a scale of 1, or none (NanoChat's norms): nothing to fold
        scale = norm.weight.detach().double() + spec.offset
        _right_(readers, torch.diag(scale))
        norm.weight.fill_(1.0 - spec.offset)


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def _wrap_output(model: nn.Module, path: str, rotation: StreamRotation) -> None:
    module = model.get_submodule(path)
    if not isinstance(module, RotatedOutput):
        _set(model, path, RotatedOutput(module, rotation))


def _stream_writers(layout: ModelLayout, writers: Mapping[str, list[str]] | None) -> dict[str, list[str]]:
    if writers is not None:
        return {"linears": list(writers.get("linears", [])), "vectors": list(writers.get("vectors", []))}
    return {"linears": list(layout.writers), "vectors": list(layout.stream_vectors)}


@torch.no_grad()
def rotate_residual_(model: nn.Module, layout: ModelLayout, q: torch.Tensor, writers: Mapping | None = None,
                     rotation: StreamRotation | None = None) -> list[str]:
    """Rotate the residual stream by orthogonal ``q (E x E)`` (reader norms must be folded first).

    ``writers``: what else writes into the stream (default: the layout's ``writers`` / ``stream_vectors``).
    ``rotation``: the online ``x ↦ x q`` placed after post-norms (required when the layout has them).
    Returns the post-norm paths that were wrapped.
    """
    _check_rotatable(layout)
    norms = [layout.final_norm] + [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm) if n is not None]
    for spec in norms:
        if not _scale_identity(model.get_submodule(spec.path), spec):
            raise ValueError(f"rotate_residual_: the scale of {spec.path} is not folded; call fold_norms_ first")
    emb, head = model.get_submodule(layout.token_embedding), model.get_submodule(layout.head)
    if getattr(head, "weight", None) is emb.weight:
        raise ValueError("rotate_residual_: the head is tied to the embedding; call fold_norms_ (it unties) first")
    writers = _stream_writers(layout, writers)
    q = q.double()
    _right_([emb.weight] + [model.get_submodule(p).weight for p in layout.position_embeddings], q)
    wrapped = []
    for b in layout.blocks:
        ins, outs = _mlp_readers(model, b.mlp)
        ins += [p for r in b.attn.readers for p in input_weights(model.get_submodule(r))]
        _right_(ins, q)
        attn_out = output_params(model.get_submodule(b.attn.o))
        for out_norm, params in ((b.attn_out_norm, attn_out), (b.mlp_out_norm, outs)):
            if out_norm is None:
                _left_(params, q)
                continue
            if rotation is None:
                raise ValueError(f"{layout.model_class}: {out_norm.path} normalizes a block output after its "
                                 "projection; pass the online rotation (rotate_model_ does)")
            _wrap_output(model, out_norm.path, rotation)
            wrapped.append(out_norm.path)
    _right_(input_weights(head), q)
    for name in writers["linears"]:
        _left_(output_params(model.get_submodule(name)), q)
    for name in writers["vectors"]:
        _right_([model.get_parameter(name)], q)
    return wrapped


def _online_targets(model: nn.Module, layout: ModelLayout, seed: int
                    ) -> tuple[dict[str, dict], dict[str, dict], list[str], list[str]]:
    """``(mlp path -> {kind, roles[, signs_seed]})`` of dense MLPs (plain ones get random signs, see
    :class:`HadamardMLP`), ``(activation path -> {down, signs_seed})`` of plain MLPs with no module of their own
    (the MLP's path is its block's), linearized expert modules, and 3-D expert modules skipped."""
    mlps, acts, experts, skipped = {}, {}, [], []
    for b in layout.blocks:
        for mlp in (b.mlp, b.mlp.shared):
            if mlp is None:
                continue
            if mlp.path == b.path:
                if mlp.kind != "plain":
                    raise NotImplementedError(f"{layout.model_class}: the online Hadamard of a {mlp.kind} MLP "
                                              "without a module of its own is not implemented")
                acts[f"{mlp.path}.{mlp.name('act')}"] = {"down": mlp.writer, "signs_seed": seed}
            elif mlp.kind == "moe":
                (experts if isinstance(model.get_submodule(mlp.experts.path), LinearExperts) else skipped).append(
                    mlp.experts.path)
            else:
                mlps[mlp.path] = {"kind": mlp.kind, "roles": dict(mlp.names)}
                if mlp.kind == "plain":
                    mlps[mlp.path]["signs_seed"] = seed
    return mlps, acts, experts, skipped


def _install_hadamard_mlp(model: nn.Module, path: str, spec: Mapping, fuse: bool) -> bool:
    mlp = model.get_submodule(path)
    if isinstance(mlp, HadamardMLP):
        return False
    new = HadamardMLP(mlp, spec["kind"], spec["roles"], spec.get("signs_seed")).to(next(mlp.parameters()).device)
    if fuse:
        _right_(input_weights(getattr(new, spec["roles"]["down"])), new.matrix())
    _set(model, path, new)
    return True


def _install_hadamard_act(model: nn.Module, path: str, spec: Mapping, fuse: bool) -> bool:
    act = model.get_submodule(path)
    if isinstance(act, HadamardAfterAct):
        return False
    weights = input_weights(model.get_submodule(spec["down"]))
    new = HadamardAfterAct(act, weights[0].shape[1], spec.get("signs_seed")).to(weights[0].device)
    if fuse:
        _right_(weights, new.matrix())
    _set(model, path, new)
    return True


def _install_hadamard_experts(model: nn.Module, path: str, fuse: bool) -> bool:
    experts = model.get_submodule(path)
    if experts.hadamard is not None:
        return False
    down = getattr(experts, experts.names[1])
    experts.hadamard = HadamardTransform(down[0].in_features).to(down[0].weight.device)
    if fuse:
        _right_([p for lin in down for p in input_weights(lin)], experts.hadamard.matrix())
    return True


def install_online_hadamard_(model: nn.Module, layout: ModelLayout, fuse: bool = True, seed: int = 0) -> dict:
    """Add the online Hadamard before every MLP output projection (fusing ``W H`` unless ``fuse=False``; ``seed``:
    the random signs of plain MLPs); returns ``{"mlps": {...}, "acts": {...}, "experts": [...], "skipped": [...]}``
    for the plan (``acts`` only when some MLP has no module of its own)."""
    mlps, acts, experts, skipped = _online_targets(model, layout, seed)
    for path, spec in mlps.items():
        _install_hadamard_mlp(model, path, spec, fuse)
    for path, spec in acts.items():
        _install_hadamard_act(model, path, spec, fuse)
    for path in experts:
        _install_hadamard_experts(model, path, fuse)
    if skipped:
        log.warning("online Hadamard skipped on %d 3-D expert modules (linearize and compress them to cover them)",
                    len(skipped))
    entry = {"mlps": mlps, "experts": experts, "skipped": skipped}
    if acts:
        entry["acts"] = acts
    return entry


@torch.no_grad()
def rotate_readers_(model: nn.Module, layout: ModelLayout, rotation: StreamRotation) -> list[str]:
    """``norm_s(x) ↦ norm_s(x) Q`` online after every reader norm (scales kept) and ``W ← W Q`` on the readers;
    returns the wrapped norm paths.  The stream itself is not rotated (see the module docstring), so any norm
    (LayerNorm's mean subtraction and bias included) and parallel blocks are covered."""
    _check_rotatable(layout, "readers")
    q = rotation_matrix(rotation.n, rotation.kind, rotation.seed)
    groups = _reader_groups(model, layout)
    wrapped = []
    for norm, readers in groups:
        _right_(readers, q)
        _wrap_output(model, norm.path, rotation)
        if norm.path not in wrapped:
            wrapped.append(norm.path)
    return wrapped


def _post_norms(layout: ModelLayout) -> bool:
    return any(b.attn_out_norm is not None or b.mlp_out_norm is not None for b in layout.blocks)


def _check_modules(model: nn.Module, layout: ModelLayout, site: str, writers: Mapping[str, list[str]]) -> None:
    """Find every weight the rotation will change before changing any: a module it cannot rotate (a ``Conv1D``
    not yet linearized, say) raises here, with the model untouched."""
    _reader_groups(model, layout)  # every reader, the MLPs' and experts' included
    if site == "stream":
        input_weights(model.get_submodule(layout.head))
        for b in layout.blocks:
            output_params(model.get_submodule(b.attn.o))
        for name in writers["linears"]:
            output_params(model.get_submodule(name))


def rotate_model_(model: nn.Module, layout: ModelLayout, kind: str = "random_hadamard", seed: int = 0,
                  online: bool = True, writers: Mapping[str, list[str]] | None = None,
                  site: str | None = None) -> dict:
    """Fold norms, untie, rotate the residual stream by H1 (``site="stream"``) or rotate online after each reader
    norm (``site="readers"``, the default for post-norm, LayerNorm and parallel-block layouts: :func:`default_site`,
    the module docstring) and (``online``) add
    the Hadamard before each MLP's output projection.  Works on dense, low-rank and joint-QKV layers, on causal
    LMs and on the language model of a VLM (whose projector output is rotated too).  Refuses layouts it cannot
    rotate exactly (up front, before touching the model).  Returns the plan's ``rotation`` entry (plain data;
    rebuilt by :func:`apply_rotation_plan` without the layout)."""
    from compression.quant import QuantLinear

    site = site or default_site(layout)
    if site not in ("stream", "readers"):
        raise ValueError(f"rotation site must be 'stream' or 'readers', got {site!r}")
    _check_rotatable(layout, site)
    if any(isinstance(m, QuantLinear) for m in model.modules()):
        raise ValueError("rotate_model_: the model is already quantized; rotate before quantize_model_")
    if site == "stream" and _post_norms(layout) and any(b.attn_norm is not None for b in layout.blocks):
        raise ValueError(f"{layout.model_class}: post-norm layouts with reader norms are rotated at the readers "
                         "(site='readers'); folding their reader scales is what broke their weight quantization")
    writers = _stream_writers(layout, writers)
    _check_modules(model, layout, site, writers)
    if online:
        _online_targets(model, layout, seed)  # refuses an MLP it cannot wrap before anything changes
    rotation = StreamRotation(layout.hidden, kind, seed).to(model.get_submodule(layout.token_embedding).weight.device)
    entry = {"residual": {"kind": kind, "seed": seed, "size": layout.hidden}}
    if site == "readers":
        entry.update(site="readers", untied=None, rotated_outputs=rotate_readers_(model, layout, rotation))
        writers = {}  # the stream is not rotated: nothing else that writes it changes
    else:
        untied = getattr(model.get_submodule(layout.head), "weight", None) is model.get_submodule(
            layout.token_embedding).weight
        fold_norms_(model, layout)
        wrapped = rotate_residual_(model, layout, rotation_matrix(layout.hidden, kind, seed), writers, rotation)
        entry.update(site="stream", rotated_outputs=wrapped,
                     untied={"head": layout.head, "embedding": layout.token_embedding} if untied else None)
    if online:
        entry["online"] = install_online_hadamard_(model, layout, seed=seed)
    if any(writers.values()):
        entry["stream_writers"] = writers
    return entry


def apply_rotation_plan(model: nn.Module, entry: Mapping) -> list[str]:
    """Rebuild the structure of :func:`rotate_model_` (untied head, online rotations, Hadamard MLPs) without
    touching weights; the entry is self-contained (no layout needed)."""
    if "online_down_proj" in entry:
        raise ValueError("this rotation plan entry was written by an older version (LLaMA-only format); "
                         "recompress the model with this version")
    changed = []
    tied = entry.get("untied")
    if tied:
        emb, head = model.get_submodule(tied["embedding"]), model.get_submodule(tied["head"])
        if getattr(head, "weight", None) is emb.weight:
            head.weight = nn.Parameter(emb.weight.detach().clone())
            if hasattr(model, "_tied_weights_keys"):
                model._tied_weights_keys = None
            changed.append(tied["head"])
    res = entry["residual"]
    if entry.get("rotated_outputs"):
        rotation = StreamRotation(int(res["size"]), res["kind"], int(res["seed"]))
        for path in entry["rotated_outputs"]:
            if not isinstance(model.get_submodule(path), RotatedOutput):
                _wrap_output(model, path, rotation)
                changed.append(path)
    online = entry.get("online") or {}
    for path, spec in online.get("mlps", {}).items():
        if _install_hadamard_mlp(model, path, spec, fuse=False):
            changed.append(path)
    for path, spec in online.get("acts", {}).items():
        if _install_hadamard_act(model, path, spec, fuse=False):
            changed.append(path)
    for path in online.get("experts", []):
        if _install_hadamard_experts(model, path, fuse=False):
            changed.append(path)
    return changed
