"""Cohere and Cohere2 (Command R, Command R7B, Aya): parallel blocks with a mean-subtracting LayerNorm.

``model.layers.i``: ``input_layernorm`` (LayerNorm without bias) feeds both ``self_attn.{q,k,v}_proj`` and
``mlp.{gate,up}_proj``; the attention's ``o_proj`` and the MLP's ``down_proj`` both add to the block input
(``parallel``).  RoPE rotates interleaved channel pairs (the family's own function, the layout's ``rope``).  Cohere
may normalize q and k per head (``use_qk_norm``: a LayerNorm with one weight row per head); Cohere2 alternates
sliding and full layers, and rotates only on the sliding ones (its full layers are NoPE).  The model scales its
logits (``logit_scale``) in its own forward.  Rotation happens at the readers (after the shared
``input_layernorm``), as for every LayerNorm family.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compression.layout import Block, ModelLayout
from models.layouts.common import join, layer_norm
from models.layouts.llama import decoder_layers, decoder_layout, gated_mlp

CONFIGS = ("CohereConfig", "Cohere2Config")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    cohere2 = type(config).__name__ == "Cohere2Config"
    blocks = []
    for p, layer, attn in layers:
        if attn.q_norm is not None:  # Cohere's optional q/k norms are LayerNorms (one weight row per head)
            attn = dataclasses.replace(attn, q_norm=layer_norm(attn.q_norm.path), k_norm=layer_norm(attn.k_norm.path))
        if cohere2 and layer.self_attn.sliding_window is None:  # a full layer: no RoPE
            attn = dataclasses.replace(attn, nope=True, rotary=None)
        blocks.append(Block(path=p, attn=attn, mlp=gated_mlp(join(p, "mlp")),
                            attn_norm=layer_norm(join(p, "input_layernorm")), mlp_norm=None, parallel=True))
    return decoder_layout(model, "cohere", config, base, head, blocks, layer_norm(join(base, "norm")))
