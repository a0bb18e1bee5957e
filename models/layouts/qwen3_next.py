"""Qwen3-Next: a hybrid of gated linear attention (Gated DeltaNet) and gated full attention, with Qwen2-MoE's
mixture of experts on every layer.

``model.layers.i``: ``input_layernorm`` -> either ``linear_attn`` (``in_proj_qkvz`` and ``in_proj_ba`` read the
normed stream; a causal convolution, the delta-rule recurrence and a gated norm follow; ``out_proj`` writes) or
``self_attn`` (``q_proj`` giving the queries and their output gate, ``k_proj``, ``v_proj``, per-head
``q_norm``/``k_norm``, ``o_proj``); ``post_attention_layernorm`` -> ``mlp`` (routed experts, a shared expert and
its sigmoid gate).  Every RMSNorm scales by ``1 + w`` (offset 1, as Gemma's).  A linear-attention layer is an
attention with ``inputs`` (its two stream readers), like DeepSeek's MLA, so rotation turns them and joint QKV
factorizes the two with a shared down.  The latent KV cache is refused: the linear-attention layers keep a
recurrent state, not keys and values, and the full-attention layers gate their output.
"""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import attention, decoder_layout
from models.layouts.moe import moe_mlp

CONFIGS = ("Qwen3NextConfig",)
LATENT_REASON = ("its linear-attention layers keep a recurrent state, not keys and values, and its full-attention "
                 "layers gate their output by part of q_proj; the latent K/V rebuild implements neither")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    decoder = model.get_submodule(base)
    config = decoder.config
    rotary = join(base, "rotary_emb")
    blocks = []
    for i, layer in enumerate(decoder.layers):
        p = join(base, "layers", str(i))
        if getattr(layer, "linear_attn", None) is not None:
            ap = join(p, "linear_attn")
            attn = Attention(path=ap, o=join(ap, "out_proj"), heads=config.linear_num_value_heads,
                             kv_heads=config.linear_num_key_heads, head_dim=config.linear_value_head_dim,
                             inputs=(join(ap, "in_proj_qkvz"), join(ap, "in_proj_ba")))
        else:
            attn = attention(layer.self_attn, join(p, "self_attn"), config, rotary, (), offset=1.0)
        blocks.append(Block(path=p, attn=attn, mlp=moe_mlp(layer, join(p, "mlp")),
                            attn_norm=rms(join(p, "input_layernorm"), 1.0),
                            mlp_norm=rms(join(p, "post_attention_layernorm"), 1.0)))
    return decoder_layout(model, "qwen3_next", config, base, head, blocks, rms(join(base, "norm"), 1.0),
                          unsupported=(("latent_cache", LATENT_REASON),))
