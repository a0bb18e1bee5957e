"""Phi-1, Phi-1.5 and Phi-2 (``PhiForCausalLM``): parallel blocks off one LayerNorm, as Cohere's.

``model.layers.i``: ``input_layernorm`` (LayerNorm with bias) feeds both ``self_attn.{q,k,v}_proj`` (with biases;
RoPE on the leading ``partial_rotary_factor`` of each head's channels; optional per-head LayerNorms ``q_layernorm`` /
``k_layernorm``) and ``mlp.fc1`` -> GELU -> ``mlp.fc2``; the attention's ``dense`` and ``fc2`` both add to the block
input (``parallel``).  The decoder ends in ``model.final_layernorm``; the head has a bias.  Rotation happens at the
readers (after the shared LayerNorm), as for every LayerNorm family.
"""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import decoder_of, eager_of, join, layer_norm, plain_mlp

CONFIGS = ("PhiConfig",)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_of(model, base)
    blocks = []
    for p, layer in layers:
        ap, mp = join(p, "self_attn"), join(p, "mlp")
        qk_norm = layer.self_attn.qk_layernorm
        attn = Attention(path=ap, o=join(ap, "dense"), q=join(ap, "q_proj"), k=join(ap, "k_proj"),
                         v=join(ap, "v_proj"), heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
                         head_dim=layer.self_attn.head_dim, rotary=join(base, "rotary_emb"),
                         q_norm=layer_norm(join(ap, "q_layernorm")) if qk_norm else None,
                         k_norm=layer_norm(join(ap, "k_layernorm")) if qk_norm else None,
                         eager=eager_of(layer.self_attn))
        mlp = plain_mlp(mp, "fc1", "activation_fn", "fc2")
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=layer_norm(join(p, "input_layernorm")),
                            mlp_norm=None, parallel=True))
    return ModelLayout(family="phi", model_class=type(model).__name__, hidden=config.hidden_size,
                       token_embedding=join(base, "embed_tokens"), blocks=tuple(blocks),
                       final_norm=layer_norm(join(base, "final_layernorm")), head=head)
