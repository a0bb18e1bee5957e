"""Qwen3-Next and Qwen3.5: hybrids of gated linear attention (Gated DeltaNet) and gated full attention; Qwen3-Next
and Qwen3.5-MoE put Qwen2-MoE's mixture of experts on every layer, Qwen3.5 a gated MLP.

``model.layers.i``: ``input_layernorm`` -> either ``linear_attn`` (``in_proj_qkvz`` and ``in_proj_ba`` read the normed
stream; Qwen3.5 splits them into ``in_proj_qkv``, ``in_proj_z``, ``in_proj_b`` and ``in_proj_a``; a causal
convolution, the delta-rule recurrence and a gated norm follow; ``out_proj`` writes) or ``self_attn`` (``q_proj``
giving the queries and their output gate, ``k_proj``, ``v_proj``, per-head ``q_norm``/``k_norm``, ``o_proj``);
``post_attention_layernorm`` -> ``mlp`` (routed experts, a shared expert and its sigmoid gate; Qwen3.5: LLaMA's gated
MLP). Every RMSNorm scales by ``1 + w`` (offset 1, as Gemma's). A linear-attention layer is an attention with
``inputs`` (its stream readers), like DeepSeek's MLA, so rotation turns them and joint QKV factorizes them with a
shared down. The latent KV cache is refused: the linear-attention layers keep a recurrent state, not keys and values,
and the full-attention layers gate their output.
"""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import decoder_of, join, rms
from models.layouts.llama import attention, decoder_layout
from models.layouts.moe import moe_mlp

CONFIGS = ("Qwen3NextConfig", "Qwen3_5TextConfig", "Qwen3_5MoeTextConfig")
# the linear attention's stream readers: Qwen3-Next's two fused ones, Qwen3.5's four
LINEAR_READERS = ("in_proj_qkvz", "in_proj_ba", "in_proj_qkv", "in_proj_z", "in_proj_b", "in_proj_a")
LATENT_REASON = ("its linear-attention layers keep a recurrent state, not keys and values, and its full-attention "
                 "layers gate their output by part of q_proj; the latent K/V rebuild implements neither")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_of(model, base)
    rotary = join(base, "rotary_emb")
    blocks = []
    for p, layer in layers:
        if getattr(layer, "linear_attn", None) is not None:
            ap = join(p, "linear_attn")
            attn = Attention(path=ap, o=join(ap, "out_proj"), heads=config.linear_num_value_heads,
                             kv_heads=config.linear_num_key_heads, head_dim=config.linear_value_head_dim,
                             inputs=tuple(join(ap, n) for n in LINEAR_READERS if hasattr(layer.linear_attn, n)))
        else:
            attn = attention(layer.self_attn, join(p, "self_attn"), config, rotary, (), offset=1.0)
        blocks.append(Block(path=p, attn=attn, mlp=moe_mlp(layer, join(p, "mlp")),
                            attn_norm=rms(join(p, "input_layernorm"), 1.0),
                            mlp_norm=rms(join(p, "post_attention_layernorm"), 1.0)))
    return decoder_layout(model, "qwen3_next", config, base, head, blocks, rms(join(base, "norm"), 1.0),
                          unsupported=(("latent_cache", LATENT_REASON),))
