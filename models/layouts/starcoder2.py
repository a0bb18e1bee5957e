"""StarCoder2: LLaMA's block order with LayerNorm (biases) and a plain MLP.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` (GQA, biases with ``use_bias``) -> rotary ->
``o_proj`` -> stream; ``post_attention_layernorm`` -> ``mlp.c_fc`` -> act -> ``mlp.c_proj`` -> stream; the window
(``config.sliding_window``) is passed to the attention function on every layer.  The attention is LLaMA's, so the
latent KV cache covers it; rotation happens at the readers, as for every LayerNorm family.
"""

from __future__ import annotations

from torch import nn

from compression.layout import Block, ModelLayout
from models.layouts.common import join, layer_norm, plain_mlp
from models.layouts.llama import decoder_layers, decoder_layout

CONFIGS = ("Starcoder2Config",)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    blocks = [Block(path=p, attn=attn,
                    mlp=plain_mlp(join(p, "mlp"), "c_fc", "act", "c_proj"),
                    attn_norm=layer_norm(join(p, "input_layernorm")),
                    mlp_norm=layer_norm(join(p, "post_attention_layernorm"))) for p, _, attn in layers]
    return decoder_layout(model, "starcoder2", config, base, head, blocks, layer_norm(join(base, "norm")))
