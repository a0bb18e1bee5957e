"""Latent KV cache for LLaMA-family attention whose q/k/v share one down projection (joint QKV).

Per token the joint layers compute ``z = D x`` (``r`` numbers) and ``k = U_k z``, ``v = U_v z``.
Instead of caching the rotated keys and the values (``2 · kv_heads · head_dim`` numbers per
token and layer) this attention caches ``z`` and the token's position, and at every step
rebuilds, for all ``S`` cached tokens,

    K = RoPE(U_k Z, positions),   V = U_v Z          (Z: S x r)

RoPE is applied *after* rebuilding the keys (it does not commute with ``U_k``), from the cached
positions.  The cache is ``r`` numbers (plus one integer position) per token and layer instead of
``2 · kv_heads · head_dim``; the price is re-multiplying ``U_k``, ``U_v`` over the whole prefix each
step (``2 S r (m_k + m_v)`` FLOPs), which can make decoding slower than a plain cache.

It lives in ``compression/`` (not ``models/``) because it needs the joint layer classes.  It works
with transformers' ``Cache`` objects unchanged: each layer's entry is a :class:`LatentCacheLayer`
(a ``DynamicLayer`` whose ``keys`` hold ``Z [B, 1, S, r]`` and ``values`` the positions
``[B, 1, S, 1]``), so ``generate()``'s cropping, beam reordering and mask sizing keep working.
A ``DynamicCache`` created by ``generate`` gets its layers swapped on first use.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from torch import nn
from transformers.cache_utils import DynamicLayer
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, eager_attention_forward

from compression.joint import LATENT_NAME, JointProjection

log = logging.getLogger(__name__)


class LatentCacheLayer(DynamicLayer):
    """``keys``: latents ``[B, 1, S, r]`` (model dtype); ``values``: positions ``[B, 1, S, 1]`` (int64)."""

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.keys = torch.zeros(*key_states.shape[:2], 0, key_states.shape[-1], dtype=key_states.dtype,
                                device=key_states.device)
        self.values = torch.zeros(*value_states.shape[:2], 0, 1, dtype=torch.long, device=key_states.device)
        self.is_initialized = True

    def update_latent(self, latent: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append ``latent [B, T, r]`` and ``positions [B, T]``; return all ``[B, S, r]``, ``[B, S]``."""
        keys, values = self.update(latent[:, None], positions[:, None, :, None])
        return keys[:, 0], values[:, 0, :, 0]

    def nbytes_per_token(self) -> int:
        """Stored bytes per token (all batch rows together): latent plus the int64 position."""
        if not self.is_initialized:
            return 0
        return self.keys.shape[0] * (self.keys.shape[-1] * self.keys.element_size() + 8)


class LatentLlamaAttention(nn.Module):
    """LlamaAttention computing K/V from a cached joint latent (same children and state-dict keys)."""

    def __init__(self, attn: nn.Module, rotary: nn.Module) -> None:
        super().__init__()
        if not hasattr(attn, LATENT_NAME) or not isinstance(attn.k_proj, JointProjection):
            raise ValueError("latent KV cache needs joint q/k/v on this attention module "
                             "(compress with joint_qkv: true)")
        latent = getattr(attn, LATENT_NAME)
        if not all(p.latent is latent for p in (attn.q_proj, attn.k_proj, attn.v_proj)):
            raise ValueError("q/k/v of this attention module do not share one latent")
        for key in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                    "is_causal"):
            setattr(self, key, getattr(attn, key))
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
        setattr(self, LATENT_NAME, latent)
        object.__setattr__(self, "rotary", rotary)  # shared with the model, not a child

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
        attention_mask: torch.Tensor | None = None,
        past_key_values=None,
        position_ids: torch.Tensor | None = None,
        cache=None,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        # transformers 5.24 renamed the decoder layers' ``past_key_values`` keyword to ``cache``
        past_key_values = cache if cache is not None else past_key_values
        kwargs.pop("use_cache", None)
        bsz, q_len = hidden_states.shape[:2]
        z = getattr(self, LATENT_NAME)(hidden_states)  # [B, T, r]
        query = self.q_proj.up(z).view(bsz, q_len, -1, self.head_dim).transpose(1, 2)
        cos, sin = position_embeddings
        query = query * cos.unsqueeze(1) + _rotate_half(query) * sin.unsqueeze(1)
        if past_key_values is not None:
            layer = _latent_layer(past_key_values, self.layer_idx)
            if position_ids is None:
                start = layer.get_seq_length()
                position_ids = torch.arange(start, start + q_len, device=z.device)[None]
            z_all, pos_all = layer.update_latent(z, position_ids.expand(bsz, q_len).to(torch.long))
        else:
            if position_ids is None:
                position_ids = torch.arange(q_len, device=z.device)[None]
            z_all, pos_all = z, position_ids.expand(bsz, q_len)
        s = z_all.shape[1]
        key = self.k_proj.up(z_all).view(bsz, s, -1, self.head_dim).transpose(1, 2)
        value = self.v_proj.up(z_all).view(bsz, s, -1, self.head_dim).transpose(1, 2)
        cos_k, sin_k = self.rotary(key, position_ids=pos_all)
        _, key = apply_rotary_pos_emb(key, key, cos_k, sin_k)
        interface: Callable = ALL_ATTENTION_FUNCTIONS.get_interface(self.config._attn_implementation,
                                                                    eager_attention_forward)
        out, weights = interface(self, query, key, value, attention_mask,
                                 dropout=0.0 if not self.training else self.attention_dropout,
                                 scaling=self.scaling, **kwargs)
        out = out.reshape(bsz, q_len, -1).contiguous()
        return self.o_proj(out), weights


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _latent_layer(cache, layer_idx: int) -> LatentCacheLayer:
    """The cache's entry for ``layer_idx`` as a :class:`LatentCacheLayer` (swapping in a fresh one)."""
    if getattr(cache, "layer_class_to_replicate", None) is not None:
        while len(cache.layers) <= layer_idx:
            cache.layers.append(LatentCacheLayer())
    layer = cache.layers[layer_idx]
    if isinstance(layer, LatentCacheLayer):
        return layer
    if type(layer) is DynamicLayer and not layer.is_initialized:
        cache.layers[layer_idx] = LatentCacheLayer()
        return cache.layers[layer_idx]
    raise TypeError(f"layer {layer_idx} of the cache is a {type(layer).__name__} already in use; the latent "
                    "KV cache needs a fresh DynamicCache (no static, sliding or quantized cache)")


def enable_latent_cache_(model: nn.Module) -> list[str]:
    """Swap every joint-QKV ``LlamaAttention`` of a LLaMA-family model for :class:`LatentLlamaAttention`."""
    base = getattr(model, "model", model)
    changed = []
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        if isinstance(attn, LatentLlamaAttention):
            continue
        if not isinstance(getattr(attn, "k_proj", None), JointProjection):
            continue
        layer.self_attn = LatentLlamaAttention(attn, base.rotary_emb)
        changed.append(f"model.layers.{i}.self_attn")
    if not changed:
        raise ValueError("enable_latent_cache_: no joint q/k/v attention found; compress with joint_qkv: true first")
    return changed


def disable_latent_cache_(model: nn.Module) -> list[str]:
    """Undo :func:`enable_latent_cache_` by moving the children back into the original attention class."""
    from transformers.models.llama.modeling_llama import LlamaAttention

    base = getattr(model, "model", model)
    changed = []
    for i, layer in enumerate(base.layers):
        attn = layer.self_attn
        if not isinstance(attn, LatentLlamaAttention):
            continue
        plain = LlamaAttention.__new__(LlamaAttention)
        nn.Module.__init__(plain)
        for key in ("config", "layer_idx", "head_dim", "num_key_value_groups", "scaling", "attention_dropout",
                    "is_causal"):
            setattr(plain, key, getattr(attn, key))
        for key in ("q_proj", "k_proj", "v_proj", "o_proj", LATENT_NAME):
            setattr(plain, key, getattr(attn, key))
        layer.self_attn = plain
        changed.append(f"model.layers.{i}.self_attn")
    return changed


def kv_bytes_per_token(model: nn.Module, latent: bool, bytes_per_value: float = 2.0) -> dict[str, float]:
    """KV-cache size per token summed over layers: ``r`` (latent) vs ``2 · kv_heads · head_dim`` values."""
    base = getattr(model, "model", model)
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    dense = 2 * cfg.num_key_value_heads * head_dim
    total_latent = 0
    for layer in base.layers:
        lat = getattr(layer.self_attn, LATENT_NAME, None)
        total_latent += lat.rank if lat is not None else dense
    n = len(base.layers)
    return {"dense_values": dense * n, "latent_values": total_latent,
            "dense_bytes": dense * n * bytes_per_value, "latent_bytes": total_latent * bytes_per_value,
            "ratio": total_latent / (dense * n), "active": float(latent)}
