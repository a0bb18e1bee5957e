"""GLM and GLM-4 (``GlmForCausalLM``, ``Glm4ForCausalLM``): LLaMA's attention with RoPE on interleaved channel pairs
over part of each head, and Phi-3's fused MLP (``gate, up = chunk(gate_up_proj(x), 2)``,
``down_proj(up · act(gate))``).

GLM's blocks are LLaMA's (``input_layernorm`` -> attention -> stream; ``post_attention_layernorm`` -> MLP ->
stream).  GLM-4 adds post-norms between each writer and the stream (``post_self_attn_layernorm``,
``post_mlp_layernorm``), so, like Gemma, it is rotated at the readers.  The latent KV cache rebuilds keys with the
family's own RoPE function (the layout's ``rope``).
"""

from __future__ import annotations

from torch import nn

from compression.layout import Block, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import decoder_layers, decoder_layout, fused_gated_mlp

CONFIGS = ("GlmConfig", "Glm4Config")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    post = type(config).__name__ == "Glm4Config"
    blocks = []
    for p, _, attn in layers:
        mp = join(p, "mlp")
        blocks.append(Block(
            path=p, attn=attn,
            mlp=fused_gated_mlp(mp),
            attn_norm=rms(join(p, "input_layernorm")), mlp_norm=rms(join(p, "post_attention_layernorm")),
            attn_out_norm=rms(join(p, "post_self_attn_layernorm")) if post else None,
            mlp_out_norm=rms(join(p, "post_mlp_layernorm")) if post else None))
    return decoder_layout(model, "glm", config, base, head, blocks, rms(join(base, "norm")))
