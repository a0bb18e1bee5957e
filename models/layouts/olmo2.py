"""Post-norm-only decoders: OLMo 2, OLMo 3, EXAONE 4 and FlexOlmo.

``model.layers.i``: the raw stream -> ``self_attn.{q,k,v}_proj``; ``q_norm`` / ``k_norm`` normalize the whole
q and k projections (all heads at once, before the heads are split) -> rotary -> ``o_proj`` ->
``post_attention_layernorm`` -> stream; the raw stream -> ``mlp.{gate,up}_proj`` -> ``down_proj`` ->
``post_feedforward_layernorm`` -> stream.  No norm sits in front of a reader, so the blocks have no reader norms
(``attn_norm=None``).  OLMo 3 alternates sliding and full layers (``config.layer_types``) and its rotary module
takes the layer type.  EXAONE 4 has the same blocks with per-head q/k norms; with a window configured, its
sliding layers get the window and RoPE and its full layers neither (global NoPE).  FlexOlmo is OLMo 2 with a
mixture of experts (Mixtral's experts and router, :func:`models.layouts.moe.moe_mlp`) in place of the MLP.

Rotation turns the stream itself (``site="stream"``): the readers read it raw, so nothing is folded but the
final norm's scale, and each post-norm's output is rotated online on its way into the stream.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import decoder_layers, decoder_layout
from models.layouts.moe import moe_mlp

CONFIGS = ("Olmo2Config", "Olmo3Config", "Exaone4Config", "FlexOlmoConfig")


def _exaone4(attn: Attention, module: nn.Module) -> Attention:
    """EXAONE 4 passes its window only on sliding layers and, when a window is set, rotates only there."""
    window = module.sliding_window if module.is_sliding else None
    nope = module.sliding_window is not None and not module.is_sliding
    return dataclasses.replace(attn, attention_kwargs=(("sliding_window", int(window)),) if window is not None else (),
                               nope=nope, rotary=None if nope else attn.rotary)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    blocks = []
    for p, layer, attn in layers:
        if type(config).__name__ == "Exaone4Config":
            attn = _exaone4(attn, layer.self_attn)
        blocks.append(Block(
            path=p, attn=attn, mlp=moe_mlp(layer, join(p, "mlp")), attn_norm=None, mlp_norm=None,
            attn_out_norm=rms(join(p, "post_attention_layernorm")),
            mlp_out_norm=rms(join(p, "post_feedforward_layernorm"))))
    return decoder_layout(model, "olmo2", config, base, head, blocks, rms(join(base, "norm")))
