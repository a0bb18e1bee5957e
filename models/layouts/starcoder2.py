"""StarCoder2: LLaMA's block order with LayerNorm (biases) and a plain MLP.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` (GQA, biases with ``use_bias``) -> rotary ->
``o_proj`` -> stream; ``post_attention_layernorm`` -> ``mlp.c_fc`` -> act -> ``mlp.c_proj`` -> stream; the window
(``config.sliding_window``) is passed to the attention function on every layer.  The attention is LLaMA's, so the
latent KV cache covers it; rotation is refused as for every LayerNorm family.
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Block, ModelLayout
from models.layouts.common import LAYERNORM_ROTATION, join, layer_norm
from models.layouts.llama import attention

CONFIGS = ("Starcoder2Config",)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    decoder = model.get_submodule(base)
    config = decoder.config
    rotary = join(base, "rotary_emb")
    blocks = []
    for i, layer in enumerate(decoder.layers):
        p = join(base, "layers", str(i))
        mp = join(p, "mlp")
        blocks.append(Block(
            path=p, attn=attention(layer.self_attn, join(p, "self_attn"), config, rotary),
            mlp=MLP(mp, "plain", (join(mp, "c_fc"),), join(mp, "c_proj"),
                    names=(("fc", "c_fc"), ("act", "act"), ("down", "c_proj"))),
            attn_norm=layer_norm(join(p, "input_layernorm")), mlp_norm=layer_norm(join(p, "post_attention_layernorm"))))
    return ModelLayout(family="starcoder2", model_class=type(model).__name__, hidden=config.hidden_size,
                       token_embedding=join(base, "embed_tokens"), blocks=tuple(blocks),
                       final_norm=layer_norm(join(base, "norm")), head=head,
                       unsupported=(("rotation", LAYERNORM_ROTATION),))
