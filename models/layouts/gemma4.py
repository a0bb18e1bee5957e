"""Gemma 4 text decoders (``Gemma4ForCausalLM``, ``Gemma4TextConfig``): dense, per-layer-embedding (E2B / E4B) and
mixture-of-experts variants.

Gemma 3's block (``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> stream,
``pre_feedforward_layernorm`` -> MLP -> ``post_feedforward_layernorm`` -> stream, √E embedding scale, sliding and full
layers by ``config.layer_types`` with a rotary table per type) with these differences that matter to compression:

- RMSNorms scale by ``w`` (offset 0, not Gemma 3's ``1 + w``); per-head ``q_norm`` / ``k_norm``, and a scale-free
  ``v_norm`` on the values; attention runs at scale 1 (the q/k norms carry it).
- Head size and KV heads can differ per layer (``config.per_layer_config``: full layers have their own).
- ``attention_k_eq_v``: full layers have no ``v_proj``, their values are the key projection (before its norm).
- KV sharing (``num_kv_shared_layers``): the last layers have no ``k_proj`` / ``v_proj`` and reuse the keys and values
  of the last earlier layer of their type.  Such attentions (and the ``k_eq_v`` ones) are given by their stream
  readers (``inputs``: ``q_proj`` alone, or ``q_proj`` and ``k_proj``), as DeepSeek's latent attention is: joint QKV
  gives a ``k_eq_v`` layer's q and k one shared down and factorizes a lone ``q_proj`` as a single layer (nothing to
  share).  ``use_double_wide_mlp`` doubles the KV-sharing layers' MLP width.
- Per-layer embeddings (``hidden_size_per_layer_input``): after the block, ``per_layer_input_gate`` reads the raw
  stream, its activation multiplies the layer's slice of the per-layer inputs (``embed_tokens_per_layer`` plus
  ``per_layer_model_projection`` of the token embeddings), ``per_layer_projection`` and
  ``post_per_layer_input_norm`` write back to the stream.  All three are plain linears: targets as any other.
- ``enable_moe_block``: beside the dense MLP, a router (``router.proj``, reading the stream through its own
  scale-free norm and a learned scale; kept dense) picks experts (``experts``, 3-D tensors as Mixtral's) that read
  ``pre_feedforward_layernorm_2``; the two outputs are post-normed apart and summed before
  ``post_feedforward_layernorm``.  In the layout the dense MLP is the experts' ``shared`` part.
- Each block ends by multiplying the stream by ``layer_scalar``.

Rotation runs at the readers, as Gemma 3's (post-norms): each reader norm's output turns online and its readers
take ``W Q``; the stream, its writers and the head stay as they are.  The per-layer-embedding gate reads the raw stream
and so stays unrotated (under W4A4 its input keeps its outliers).  Refused up front: rotation of MoE variants (the
experts read a second pre-norm and the router its own scale-free norm times a learned scale: a block here has one
MLP reader norm), the latent KV cache (value norm, KV sharing and ``k_eq_v`` values), and block-sequential compression
of KV-sharing models (a shared layer reads keys and values another block computes in the same forward).
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Attention, Block, Experts, ModelLayout
from models.layouts.common import decoder_of, eager_of, join, rms, sliding_kwargs
from models.layouts.llama import decoder_layout, gated_mlp
from models.layouts.moe import experts_readers

CONFIGS = ("Gemma4TextConfig",)
ROTATION_REASON = ("the MoE block's experts read a second pre-norm (pre_feedforward_layernorm_2) and its router "
                   "reads the stream through its own scale-free norm times a learned scale; the reader-side rotation "
                   "knows one MLP reader norm per block")
SEQUENTIAL_REASON = ("its last {n} layers reuse the keys and values an earlier layer computes in the same forward "
                     "(num_kv_shared_layers); block by block, a shared layer would read another batch's keys and "
                     "values: use calibration.mode: all_at_once")
LATENT_PARTS = ("it normalizes each value head (v_norm)", "its last layers reuse earlier layers' keys and values",
                "its full layers take their values from the key projection (attention_k_eq_v)")


def _latent_reason(config, shared: int) -> str:
    """Why the latent K/V rebuild cannot serve this model: the value norm always, KV sharing and ``k_eq_v`` values
    where the config has them."""
    parts = [LATENT_PARTS[0]] + [p for p, on in zip(LATENT_PARTS[1:], (shared, config.attention_k_eq_v)) if on]
    what = "none of these" if len(parts) > 1 else "no value norm"
    return f"Gemma 4: {'; '.join(parts)}; the latent K/V rebuild implements {what}"


def _attention(attn: nn.Module, path: str, config, rotary: str, layer_type: str) -> Attention:
    readers = tuple(join(path, n) for n in ("q_proj", "k_proj", "v_proj") if getattr(attn, n, None) is not None)
    kv_heads = config.num_attention_heads // attn.num_key_value_groups
    projections = dict(q=readers[0], k=readers[1], v=readers[2]) if len(readers) == 3 else dict(inputs=readers)
    return Attention(
        path=path, o=join(path, "o_proj"), heads=config.num_attention_heads, kv_heads=kv_heads,
        head_dim=attn.head_dim, q_norm=rms(join(path, "q_norm")),
        k_norm=rms(join(path, "k_norm")) if hasattr(attn, "k_norm") else None, rotary=rotary,
        rotary_args=(layer_type,), attention_kwargs=sliding_kwargs(attn, config, "module"), eager=eager_of(attn),
        **projections)


def _mlp(layer: nn.Module, path: str) -> MLP:
    """The dense gated MLP, or (``enable_moe_block``) the experts beside it with the dense MLP as their shared part."""
    dense = gated_mlp(join(path, "mlp"))
    if not getattr(layer, "enable_moe_block", False):
        return dense
    ep = join(path, "experts")
    experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn",
                      count=layer.experts.num_experts, router=join(path, "router", "proj"))
    return MLP(path, "moe", experts_readers(layer.experts, ep, "gate_up_proj"), None, experts=experts, shared=dense)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_of(model, base)
    rotary = join(base, "rotary_emb")
    blocks = []
    moe = any(getattr(layer, "enable_moe_block", False) for _, layer in layers)
    shared = sum(layer.self_attn.is_kv_shared_layer for _, layer in layers)
    for i, (p, layer) in enumerate(layers):
        attn = _attention(layer.self_attn, join(p, "self_attn"), config, rotary, config.layer_types[i])
        blocks.append(Block(
            path=p, attn=attn, mlp=_mlp(layer, p),
            attn_norm=rms(join(p, "input_layernorm")), mlp_norm=rms(join(p, "pre_feedforward_layernorm")),
            attn_out_norm=rms(join(p, "post_attention_layernorm")),
            mlp_out_norm=rms(join(p, "post_feedforward_layernorm"))))
    return decoder_layout(model, "gemma4", config, base, head, blocks, rms(join(base, "norm")),
                          embedding_scale=float(model.get_submodule(base).embed_tokens.embed_scale),
                          unsupported=((("rotation", ROTATION_REASON),) if moe else ())
                          + (("latent_cache", _latent_reason(config, shared)),)
                          + ((("sequential", SEQUENTIAL_REASON.format(n=shared)),) if shared else ()))
