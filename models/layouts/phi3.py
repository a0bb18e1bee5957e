"""Phi-3: LLaMA-shaped blocks with a fused ``self_attn.qkv_proj`` (rows ``[q | k | v]``) and a fused
``mlp.gate_up_proj`` (``gate, up = chunk(gate_up(x), 2)``); partial rotary when ``partial_rotary_factor < 1``."""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout, row_ranges
from models.layouts.common import decoder_of, eager_of, join, rms, sliding_kwargs
from models.layouts.llama import fused_gated_mlp

CONFIGS = ("Phi3Config",)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_of(model, base)
    blocks = []
    for p, layer in layers:
        a, ap = layer.self_attn, join(p, "self_attn")
        d, h, g = a.head_dim, config.num_attention_heads, config.num_key_value_heads
        attn = Attention(path=ap, o=join(ap, "o_proj"), qkv=join(ap, "qkv_proj"),
                         qkv_rows=row_ranges([h * d, g * d, g * d]),
                         heads=h, kv_heads=g, head_dim=d, rotary=join(base, "rotary_emb"),
                         attention_kwargs=sliding_kwargs(a, config, "config"), eager=eager_of(a))
        mp = join(p, "mlp")
        mlp = fused_gated_mlp(mp)
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=rms(join(p, "input_layernorm")),
                            mlp_norm=rms(join(p, "post_attention_layernorm"))))
    return ModelLayout(family="phi3", model_class=type(model).__name__, hidden=config.hidden_size,
                       token_embedding=join(base, "embed_tokens"), blocks=tuple(blocks),
                       final_norm=rms(join(base, "norm")), head=head)
