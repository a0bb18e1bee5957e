"""Latent KV cache for attention whose q/k/v share one down projection (joint QKV, or a compressed fused qkv).

Per token a joint group computes ``z = D x`` (``r`` numbers) and ``k = U_k z``, ``v = U_v z`` (separate
projections sharing :class:`~compression.joint.JointLatent`, or the rows of a fused qkv
:class:`~compression.lowrank.LowRankLinear`'s ``up`` that the layout assigns to k and v).  Instead of caching the
rotated keys and the values (``2 · kv_heads · head_dim`` numbers per token and layer) this attention caches ``z``
and the token's position, and at every step rebuilds, for all ``S`` cached tokens,

    K = RoPE(k_norm(U_k Z), positions),   V = U_v Z          (Z: S x r)

When decoding one token the values are never rebuilt: the attention weights ``a`` sum to one, so
``Σ_t a_t (U_v z_t + b) = U_v (Σ_t a_t z_t) + b`` (``H S r + H d r`` FLOPs instead of ``S r m_v``).  The keys
cannot be absorbed the same way: RoPE rotates each key by its own position after ``U_k``.

with the family's per-head key norm (Qwen3, Gemma3) and its rotary module called with the layer's arguments
(Gemma3: the layer type, which selects θ), both from the layout (no rotation on SmolLM3's NoPE layers, nor in
GPT-2, whose positions are learned embeddings added to the stream; the family's own RoPE function where it is
not rotate-half: Ernie 4.5, Helium, GLM, Cohere, GPT-OSS).  The replaced attention's own dropouts come along,
whatever their form (a float, or GPT-2's ``nn.Dropout`` modules).
RoPE is applied *after* rebuilding the keys (it does not commute with ``U_k``), from the cached positions;
partial rotary (``cos`` narrower than a head) rotates the leading channels only.  The cache is ``r`` numbers
(plus one integer position) per token and layer; the price is re-multiplying ``U_k`` over the whole prefix each
step (``S r m_k`` multiply-adds per layer), which makes decoding slower than a plain cache, increasingly with ``S``.

``keys="plain"`` trades memory for that time: the new tokens' keys are rotated once (as the plain attention
does) and cached next to ``z``; the values stay latent and folded.  ``kv_heads · head_dim + r`` numbers per
token and layer -- less than the plain cache's ``2 · kv_heads · head_dim`` only when ``r < kv_heads · head_dim``
-- and per step only the plain cache's key reads plus ``H S r`` for the values.

``keys="auto"`` decides per layer so that the cache is never bigger or slower than the plain one: ``keys="plain"``
where ``r < kv_heads · head_dim`` (less memory, and the value fold reads ``r`` numbers per token instead of
``head_dim`` per kv head), the plain attention elsewhere (at such ranks a latent costs memory and time).

It works with transformers' ``Cache`` objects unchanged: each layer's entry is one of
:mod:`compression.latent_cache_layers` (a ``DynamicLayer`` appending into spare capacity, or on sliding-window
layers a ``DynamicSlidingWindowLayer`` keeping the last ``window - 1`` tokens, so the attention mask sizes are
those of the plain cache).  A cache created by ``generate`` gets its layers swapped on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from compression.joint import LATENT_NAME, JointProjection
from compression.latent_cache_layers import KEY_MODES, LatentCacheLayer, LatentSlidingLayer, latent_layer
from compression.layout import Attention, ModelLayout, rows_index
from compression.lowrank import LowRankLinear

log = logging.getLogger(__name__)


def _rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x [B, H, S, D]`` with ``cos``/``sin [B, S, d]`` (``d <= D``: partial rotary on the first ``d`` channels).

    ``x cos + rotate_half(x) sin`` written half by half (the same products and sums, so the same floats as
    transformers' ``apply_rotary_pos_emb``) without materializing ``rotate_half(x)``.  When autograd records
    (training with the latent attention), the halves are built out of place: autograd refuses in-place updates
    of ``split``'s views.
    """
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    d = cos.shape[-1]
    rot = x if d == x.shape[-1] else x[..., :d]
    x1, x2 = rot.split(d // 2, dim=-1)
    sin1, sin2 = sin.split(d // 2, dim=-1)
    if torch.is_grad_enabled() and (x.requires_grad or cos.requires_grad or sin.requires_grad):
        cos1, cos2 = cos.split(d // 2, dim=-1)
        out = torch.cat([x1 * cos1 - x2 * sin1, x2 * cos2 + x1 * sin2], dim=-1)
    else:
        out = rot * cos
        out1, out2 = out.split(d // 2, dim=-1)
        # in place on views of ``out`` (``out[..] -= y`` would add a ``__setitem__`` copy back per half)
        out1.sub_(x2 * sin1)
        out2.add_(x1 * sin2)
    return out if d == x.shape[-1] else torch.cat([out, x[..., d:]], dim=-1)


def _relative(spec: Attention, path: str | None) -> str | None:
    return None if path is None else path[len(spec.path) + 1:]


def _dropout_p(module: nn.Module, *names: str) -> float:
    """The first of ``names`` the replaced attention has, as a probability: a float (LLaMA's and Falcon's
    ``attention_dropout``, OPT's ``dropout``) or an ``nn.Dropout`` (GPT-2's ``attn_dropout`` / ``resid_dropout``)."""
    for name in names:
        value = getattr(module, name, None)
        if value is not None:
            return float(value.p if isinstance(value, nn.Dropout) else value)
    return 0.0


class LatentAttention(nn.Module):
    """An attention module computing K/V from a cached joint latent; same children (state-dict keys) and public
    attributes as the module it replaces, which :func:`disable_latent_cache_` restores."""

    def __init__(self, attn: nn.Module, spec: Attention, rotary: nn.Module | None, keys: str = "latent") -> None:
        super().__init__()
        self.key_mode = keys
        for key, value in attn.__dict__.items():
            if not key.startswith("_") and key != "training":
                setattr(self, key, value)
        for name, child in attn.named_children():
            self.add_module(name, child)
        for name, param in attn.named_parameters(recurse=False):  # GPT-OSS's sinks: same tensor, same state-dict key
            self.register_parameter(name, param)
        self.roles = {r: _relative(spec, getattr(spec, r)) for r in ("q", "k", "v", "qkv", "o")}
        self.roles.update({r: _relative(spec, getattr(spec, r).path) if getattr(spec, r) else None
                           for r in ("q_norm", "k_norm")})
        self.head_dim_, self.rotary_args = spec.head_dim, tuple(spec.rotary_args)
        self.extra = dict(spec.attention_kwargs)
        self.eager = spec.eager
        self.rows = [rows_index(r) for r in spec.qkv_rows] if spec.fused else None
        object.__setattr__(self, "rotary", rotary)    # shared with the model, not a child
        self.rope_fn = spec.rope                      # the family's own RoPE (not rotate-half), or None: _rope
        self.query_scale = spec.query_scale           # positions -> factor on the rotated queries, or None
        self.qk_norm_whole, self.qk_norm_after_rope = spec.qk_norm_whole, spec.qk_norm_after_rope
        self.prescaled = spec.prescaled_queries      # OPT: q * scaling first, then the product at scale 1
        object.__setattr__(self, "original", attn)    # restored by disable_latent_cache_
        self.train(attn.training)  # a module built for an eval-mode model stays in eval mode

    def _child(self, role: str) -> nn.Module | None:
        name = self.roles.get(role)
        return None if name is None else getattr(self, name)

    def _latent(self, x: torch.Tensor) -> torch.Tensor:
        if self.rows is not None:
            return self._child("qkv").down(x)
        return getattr(self, LATENT_NAME).down(x)  # read once here: no memo to hold the latent until the next call

    def _project(self, z: torch.Tensor, roles: tuple[str, ...]) -> list[torch.Tensor]:
        if self.rows is not None:
            out = self._child("qkv").up(z)
            index = {"q": 0, "k": 1, "v": 2}
            return [out[..., self.rows[index[r]]] for r in roles]
        return [self._child(r).up(z) for r in roles]

    def _heads(self, x: torch.Tensor, norm: str) -> torch.Tensor:
        """``x [B, T, heads · d]`` as ``[B, heads, T, d]``, through the family's q/k norm: per head, or over the whole
        projection before the heads are split (OLMo 2 / 3)."""
        module = None if self.qk_norm_after_rope else self._child(norm)
        if module is not None and self.qk_norm_whole:
            x, module = module(x), None
        x = x.view(*x.shape[:2], -1, self.head_dim_)
        return (module(x) if module is not None else x).transpose(1, 2)

    def _late_norm(self, heads: torch.Tensor, norm: str) -> torch.Tensor:
        """The q/k norm of families that normalize the *rotated* heads (HunYuan), on ``[B, heads, T, d]``."""
        module = self._child(norm) if self.qk_norm_after_rope else None
        return module(heads) if module is not None else heads

    def forward(self, hidden_states: torch.Tensor,
                position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
                attention_mask: torch.Tensor | None = None, past_key_values=None,
                position_ids: torch.Tensor | None = None, cache=None, layer_past=None,
                **kwargs) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers 5.24 renamed the decoder layers' ``past_key_values`` keyword to ``cache``; GPT-NeoX's layer
        # hands it on as ``layer_past``
        past_key_values = next((c for c in (cache, layer_past) if c is not None), past_key_values)
        kwargs.pop("use_cache", None)
        if position_ids is not None:  # the plain attention hands them on (flash attention's packed sequences)
            kwargs["position_ids"] = position_ids
        if getattr(self, "sinks", None) is not None:  # as GPT-OSS's attention does (kernels read s_aux, eager sinks)
            kwargs["s_aux"] = self.sinks
        bsz, q_len = hidden_states.shape[:2]
        absorbs = self._absorbs(q_len)
        z = self._latent(hidden_states)  # [B, T, r]
        if position_embeddings is None and self.rotary is not None:
            raise ValueError(f"{type(self.original).__name__}: the decoder layer passed no position_embeddings to a "
                             "rotary attention")
        cos, sin = position_embeddings if position_embeddings is not None else (None, None)  # GPT-2: none
        if self.key_mode == "plain":  # rotate the new keys once, as the plain attention does, and cache them
            q, k = self._project(z, ("q", "k"))
            heads = self._heads(q, "q_norm")
            # one RoPE over the query and key heads together: half the small ops of a decode step's rotation
            both = self._rotate(torch.cat([heads, self._heads(k, "k_norm")], dim=1), cos, sin)
            query, key = both.split([heads.shape[1], both.shape[1] - heads.shape[1]], dim=1)
            query = self._scale_query(self._late_norm(query, "q_norm"), position_ids)
            key = self._late_norm(key, "k_norm")
            z_all = z
            if past_key_values is not None:
                layer = latent_layer(past_key_values, self.layer_idx, "plain")
                key, z_all = layer.update_keys_latent(key, z)
            value = None if absorbs else self._project(z_all, ("v",))[0]
        else:
            (q,) = self._project(z, ("q",))
            query = self._late_norm(self._rotate(self._heads(q, "q_norm"), cos, sin), "q_norm")
            query = self._scale_query(query, position_ids)
            if past_key_values is not None:
                layer = latent_layer(past_key_values, self.layer_idx, "latent")
                if position_ids is None:
                    start = layer.get_seq_length()
                    position_ids = torch.arange(start, start + q_len, device=z.device)[None]
                z_all, pos_all = layer.update_latent(z, position_ids.expand(bsz, q_len).to(torch.long))
            else:
                if position_ids is None:
                    position_ids = torch.arange(q_len, device=z.device)[None]
                z_all, pos_all = z, position_ids.expand(bsz, q_len)
            k, *rest = self._project(z_all, ("k",) if absorbs else ("k", "v"))
            key = self._heads(k, "k_norm")
            if self.rotary is not None:
                key = self._rotate(key, *self._key_rotary(past_key_values, key, pos_all))
            key = self._late_norm(key, "k_norm")
            value = None if absorbs else rest[0]
        if absorbs:
            out = self._absorbed(query, key, z_all, attention_mask)
            return self._output(out.reshape(bsz, q_len, -1).contiguous()), None
        value = self._heads(value, "v_norm")
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation, self.eager)
        dropout = _dropout_p(self, "attention_dropout", "attn_dropout", "dropout") if self.training else 0.0
        out, weights = interface(self, query, key, value, attention_mask, dropout=dropout, scaling=self._score_scale,
                                 **self.extra, **kwargs)
        out = out.reshape(bsz, q_len, -1).contiguous()
        return self._output(out), weights

    def _output(self, out: torch.Tensor) -> torch.Tensor:
        """The output projection, then the dropout some attentions apply to their own output (StarCoder2 and
        Seed-OSS: ``residual_dropout``; GPT-2: ``resid_dropout``, copied from the replaced module; active in
        training mode only)."""
        out = self._child("o")(out)
        p = _dropout_p(self, "residual_dropout", "resid_dropout")
        return F.dropout(out, p=p, training=self.training) if p else out

    def _rotate(self, heads: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on ``heads [B, H, S, d]``: the family's own function where the layout gives one (its key argument
        an empty head slice), else :func:`_rope`; ``heads`` unchanged on a NoPE layer (no rotary module)."""
        if self.rotary is None:
            return heads
        if self.rope_fn is not None:
            return self.rope_fn(heads, heads[:, :0], cos, sin)[0]
        return _rope(heads, cos, sin)

    @property
    def _score_scale(self) -> float:
        return 1.0 if self.prescaled else self.scaling

    def _scale_query(self, query: torch.Tensor, position_ids: torch.Tensor | None) -> torch.Tensor:
        """The rotated queries times the family's position-dependent factor, where the layout gives one
        (Ministral 3: ``1 + β log(1 + ⌊p / P⌋)``), or times the attention scale where the family scales its queries
        first (OPT), else unchanged."""
        if self.prescaled:
            return query * self.scaling
        if self.query_scale is None:
            return query
        if position_ids is None:
            raise ValueError(f"{type(self.original).__name__}: its query scale depends on the positions; the "
                             "decoder layer passed no position_ids")
        return query * self.query_scale(position_ids).to(query.dtype)

    def _key_rotary(self, cache, key: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos``/``sin`` of the cached positions; computed once per step and rotary kind, not once per layer
        (the layers of one step see the same positions unless a sliding window has dropped some)."""
        tag = (self.rotary_args, key.dtype, key.device)
        memo = getattr(cache, "_latent_rotary", None)
        if memo is not None and tag in memo:
            seen, cos, sin = memo[tag]
            if seen.shape == positions.shape and torch.equal(seen, positions):
                return cos, sin
        cos, sin = self.rotary(key, positions, *self.rotary_args)
        if cache is not None:  # transient: replaced at the next step, S x head_dim per rotary kind
            cache.__dict__.setdefault("_latent_rotary", {})[tag] = (positions.clone(), cos, sin)
        return cos, sin

    # -- decoding without rebuilding the values ------------------------------------------------------
    def _absorbs(self, q_len: int) -> bool:
        """One new token (decoding), no value norm, no attention extras beyond a sliding window and a score cap,
        not training: the values are folded into the output instead of being rebuilt for the whole prefix."""
        return (q_len == 1 and not self.training and self.roles.get("v_norm") is None
                and set(self.extra) <= {"sliding_window", "softcap"}
                and self.config._attn_implementation in ("sdpa", "eager"))

    def _value_up(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``U_v`` as ``[kv_heads, head_dim, r]`` and its bias ``[kv_heads, head_dim]`` (or ``None``)."""
        if self.rows is not None:
            up = self._child("qkv").up
            w, b = up.weight[self.rows[2]], None if up.bias is None else up.bias[self.rows[2]]
        else:
            up = self._child("v").up
            w, b = up.weight, up.bias
        return w.view(-1, self.head_dim_, w.shape[-1]), None if b is None else b.view(-1, self.head_dim_)

    def _absorbed(self, query: torch.Tensor, key: torch.Tensor, z_all: torch.Tensor,
                  attention_mask: torch.Tensor | None) -> torch.Tensor:
        """``softmax(q Kᵀ s) (Z U_vᵀ + b)`` computed as ``(softmax(q Kᵀ s) Z) U_vᵀ + b`` (the weights sum to 1;
        with a ``softcap`` ``c`` the scores are ``c tanh(q Kᵀ s / c)``).

        ``query [B, H, 1, d]``, rotated ``key [B, G, S, d]`` (``G`` kv heads, ``H / G`` query heads each),
        ``z_all [B, S, r]``; returns ``[B, 1, H, d]`` like transformers' attention functions.  The value
        side costs ``H S r + H d r`` instead of rebuilding ``S r (G d)`` values every step.
        """
        bsz, heads, q_len, dim = query.shape
        groups, seq = key.shape[1], key.shape[2]
        per = heads // groups * q_len  # query rows per kv head
        # query heads grouped by their kv head, one batched GEMM over (batch, kv head); cached plain keys are a
        # prefix view of a [B, G, capacity, d] buffer, so flattening B and G needs no copy
        scores = torch.bmm(query.reshape(bsz * groups, per, dim), key.flatten(0, 1).transpose(1, 2))
        scores = scores.mul_(self._score_scale).view(bsz, heads, q_len, seq)
        cap = self.extra.get("softcap")
        if cap is not None:  # Gemma 2: scores capped at +-cap before the mask, as its eager attention does
            scores = torch.tanh(scores / cap) * cap
        if attention_mask is not None:
            mask = attention_mask[..., :seq]
            scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        sinks = getattr(self, "sinks", None)
        if sinks is not None:  # GPT-OSS: one more logit per head in every softmax, dropped after it
            scores = torch.cat([scores, sinks.to(scores.dtype).view(1, -1, 1, 1).expand(bsz, -1, q_len, 1)], dim=-1)
            scores = scores - scores.amax(dim=-1, keepdim=True)  # as its eager attention does
        if query.dtype in (torch.float32, torch.float64):
            probs = scores.softmax(dim=-1)
        else:  # half precision: softmax in float32, as transformers' eager attention
            probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
        if sinks is not None:
            probs = probs[..., :-1]  # the weights now sum to less than 1: the value bias is scaled by their sum
        # one GEMM per batch row reading Z once: [B, H q, S] @ [B, S, r]
        pz = torch.bmm(probs.reshape(bsz, heads * q_len, seq), z_all)
        weight, bias = self._value_up()  # [G, d, r]
        if bsz == 1:  # [G, H/G, r] @ [G, r, d]: the batched GEMM the broadcasting matmul below would run
            out = torch.bmm(pz.view(groups, per, -1), weight.transpose(1, 2)).unsqueeze(0)
        else:
            out = pz.view(bsz, groups, per, -1) @ weight.transpose(-1, -2)  # [B, G, H/G, d]
        if bias is not None:
            total = probs.sum(-1).view(bsz, groups, per, 1) if sinks is not None else 1.0
            out = out + bias[None, :, None, :] * total
        return out.reshape(bsz, heads, q_len, dim).transpose(1, 2)


def _is_joint(model: nn.Module, spec: Attention) -> bool:
    if spec.fused:
        return isinstance(model.get_submodule(spec.qkv), LowRankLinear)
    attn = model.get_submodule(spec.path)
    latent = getattr(attn, LATENT_NAME, None)
    members = [model.get_submodule(p) for p in (spec.q, spec.k, spec.v)]
    return latent is not None and all(isinstance(m, JointProjection) and m.latent is latent for m in members)


def _latent_rank(model: nn.Module, spec: Attention) -> int:
    if spec.fused:
        return model.get_submodule(spec.qkv).rank
    return getattr(model.get_submodule(spec.path), LATENT_NAME).rank


def _layer_mode(model: nn.Module, spec: Attention, keys: str) -> str | None:
    """The key mode a joint attention gets under ``keys`` (``"auto"`` resolved), or None: keep it plain."""
    if keys != "auto":
        return keys
    return "plain" if _latent_rank(model, spec) < spec.kv_heads * spec.head_dim else None


REBUILT_PARAMETERS = ("sinks",)
"""Parameters of an attention module itself (not of a child) that :class:`LatentAttention` uses: GPT-OSS's
per-head sink logits."""


def _undescribed_parts(attn: nn.Module, spec: Attention) -> list[str]:
    """The children of ``attn`` holding parameters that no role of ``spec`` names (q, k, v, qkv, o, the q/k norms,
    the joint latent), and its own parameters other than :data:`REBUILT_PARAMETERS`: computation the rebuilt
    attention would leave out."""
    known = {_relative(spec, getattr(spec, r)) for r in ("q", "k", "v", "qkv", "o")} | {LATENT_NAME}
    known |= {_relative(spec, norm.path) for norm in (spec.q_norm, spec.k_norm) if norm is not None}
    children = [name for name, child in attn.named_children()
                if name not in known and next(child.parameters(), None) is not None]
    return children + [name for name, _ in attn.named_parameters(recurse=False) if name not in REBUILT_PARAMETERS]


def enable_latent_cache_(model: nn.Module, layout: ModelLayout, keys: str = "latent") -> list[str]:
    """Swap every attention whose q/k/v share one latent for :class:`LatentAttention`; returns their paths.

    ``keys="latent"`` caches only ``z`` (and positions) and rebuilds the keys every step; ``keys="plain"``
    caches the rotated keys and ``z`` for the values (more memory, no rebuild over the prefix); ``keys="auto"``
    uses ``"plain"`` on the layers whose latent rank is below ``kv_heads · head_dim`` and leaves the others
    plain (an empty list, with a warning, when no layer qualifies).

    Refused up front for layouts without a latent K/V rebuild (their layout says why), for attentions without
    rotary positions (NoPE layers, which rotate neither queries nor keys, rebuild their keys unrotated) and for
    attentions with a child holding parameters that the layout does not name (StableLM's per-head q/k LayerNorms
    ``q_layernorm`` / ``k_layernorm``: rebuilt without them, its scores were off by 6e-2) or with a parameter of
    their own that the rebuild does not use (any but GPT-OSS's ``sinks``), before any layer is swapped; attentions
    that are not joint keep the plain cache.
    """
    if keys not in (*KEY_MODES, "auto"):
        raise ValueError(f"enable_latent_cache_: keys={keys!r}; choose one of {(*KEY_MODES, 'auto')}")
    layout.require("latent_cache")
    swaps, joint = [], 0
    for block in layout.blocks:  # every layer checked before any is swapped: a refusal leaves the model as it was
        spec = block.attn
        attn = model.get_submodule(spec.path)
        if isinstance(attn, LatentAttention) or not _is_joint(model, spec):
            continue
        joint += 1
        mode = _layer_mode(model, spec, keys)
        if mode is None:
            continue
        if spec.rotary is None and not spec.nope:
            raise NotImplementedError(f"{layout.model_class}: the latent KV cache rebuilds rotary keys; {spec.path} "
                                      "has no rotary module")
        unknown = _undescribed_parts(attn, spec)
        if unknown:
            raise NotImplementedError(
                f"{layout.model_class}: the latent KV cache rebuilds q, k and v from the latent with only the modules "
                f"the layout names; {spec.path} also has {unknown} ({type(getattr(attn, unknown[0])).__name__}), "
                "which the layout does not describe (per-head norms under other names, a learned scale...), so the "
                "rebuild would skip them")
        swaps.append((spec, attn, mode))
    changed = []
    for spec, attn, mode in swaps:
        parent, _, child = spec.path.rpartition(".")
        rotary = None if spec.nope else model.get_submodule(spec.rotary)
        setattr(model.get_submodule(parent), child, LatentAttention(attn, spec, rotary, mode))
        changed.append(spec.path)
    if not changed and joint:  # keys="auto" and every latent at least as wide as the keys it would replace
        log.warning("enable_latent_cache_(keys='auto'): every joint latent rank is >= kv_heads * head_dim, where a "
                    "latent cache costs more memory and time than the plain cache; all %d layers keep it", joint)
        return changed
    if not changed:
        raise ValueError("enable_latent_cache_: no attention with q/k/v sharing one latent; compress with "
                         "joint_qkv: true (separate q/k/v) or compress the fused qkv projection first")
    return changed


def disable_latent_cache_(model: nn.Module) -> list[str]:
    """Undo :func:`enable_latent_cache_`: the original attention modules come back with the current children."""
    changed = []
    for name, module in list(model.named_modules()):
        if not isinstance(module, LatentAttention):
            continue
        original = module.original
        for child_name, child in module.named_children():
            original._modules[child_name] = child
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, original)
        changed.append(name)
    return changed


def kv_bytes_per_token(model: nn.Module, layout: ModelLayout, latent: bool, bytes_per_value: float = 2.0,
                       keys: str = "latent") -> dict[str, float]:
    """KV-cache size per token summed over layers: ``r`` (``keys="latent"``) or ``kv_heads · head_dim + r``
    (``keys="plain"``) vs ``2 · kv_heads · head_dim`` values; layers that are not joint, or that ``keys="auto"``
    leaves plain, count as plain."""
    if keys not in (*KEY_MODES, "auto"):
        raise ValueError(f"kv_bytes_per_token: keys={keys!r}; choose one of {(*KEY_MODES, 'auto')}")
    dense_total = latent_total = 0
    for block in layout.blocks:
        spec = block.attn
        dense = 2 * spec.kv_heads * spec.head_dim
        dense_total += dense
        mode = _layer_mode(model, spec, keys) if _is_joint(model, spec) else None
        if mode is None:
            latent_total += dense
            continue
        latent_total += _latent_rank(model, spec)
        if mode == "plain":
            latent_total += spec.kv_heads * spec.head_dim
    return {"dense_values": dense_total, "latent_values": latent_total,
            "dense_bytes": dense_total * bytes_per_value, "latent_bytes": latent_total * bytes_per_value,
            "ratio": latent_total / dense_total, "active": float(latent)}


__all__ = ["LatentAttention", "LatentCacheLayer", "LatentSlidingLayer", "disable_latent_cache_",
           "enable_latent_cache_", "kv_bytes_per_token"]
