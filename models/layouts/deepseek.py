"""DeepSeek-V2 / V3 (and models built on them: DeepSeek-R1, Kimi K2): multi-head latent attention (MLA) and a
mixture of experts.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.q_a_proj`` (V3, or V2 with ``q_lora_rank``) ->
``q_a_layernorm`` -> ``q_b_proj``, or ``self_attn.q_proj`` (V2-Lite); and ``self_attn.kv_a_proj_with_mqa`` ->
(latent ``c_kv`` -> ``kv_a_layernorm`` -> ``kv_b_proj``, and the shared RoPE key) -> attention -> ``o_proj``.
Only the first projection of each path reads the stream, so the attention's ``inputs`` are ``q_a_proj`` (or
``q_proj``) and ``kv_a_proj_with_mqa``: rotation turns them, and joint QKV factorizes the two as one matrix with a
shared down (the QSVD idea applied to what MLA's stream readers are).  Every linear, ``q_b_proj`` and ``kv_b_proj``
included, is a compression target.  The MLP is the MoE layout's (:mod:`models.layouts.moe`): routed experts, a
router with a score correction bias at ``mlp.gate``, always-on ``shared_experts``; the first
``first_k_dense_replace`` layers are dense.  The latent KV cache is refused: MLA already caches its own compressed
latent, and the cache here rebuilds the keys and values of q/k/v projections.
"""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import decoder_of, join, rms
from models.layouts.llama import decoder_layout
from models.layouts.moe import moe_mlp

CONFIGS = ("DeepseekV2Config", "DeepseekV3Config")
MLA_CACHE = ("multi-head latent attention already caches a compressed latent (kv_a_proj_with_mqa's output); the "
             "latent KV cache rebuilds the keys and values of q/k/v projections")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_of(model, base)
    blocks = []
    for p, layer in layers:
        ap = join(p, "self_attn")
        q = "q_a_proj" if getattr(layer.self_attn, "q_a_proj", None) is not None else "q_proj"
        heads = config.num_attention_heads
        attn = Attention(path=ap, o=join(ap, "o_proj"), heads=heads, kv_heads=heads,
                         head_dim=config.qk_nope_head_dim + config.qk_rope_head_dim,
                         inputs=(join(ap, q), join(ap, "kv_a_proj_with_mqa")), rotary=join(base, "rotary_emb"))
        blocks.append(Block(path=p, attn=attn, mlp=moe_mlp(layer, join(p, "mlp")),
                            attn_norm=rms(join(p, "input_layernorm")),
                            mlp_norm=rms(join(p, "post_attention_layernorm"))))
    return decoder_layout(model, "deepseek", config, base, head, blocks, rms(join(base, "norm")),
                          unsupported=(("latent_cache", MLA_CACHE),))
