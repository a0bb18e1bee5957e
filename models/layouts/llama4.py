"""Llama 4 (Scout, Maverick; ``Llama4ForCausalLM``): LLaMA's blocks with a mixture of experts on some layers.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` -> ``o_proj``; ``post_attention_layernorm``
-> ``feed_forward``: on the layers of ``config.moe_layers`` a :class:`Llama4TextMoe` whose ``router`` (an
``nn.Linear`` subclass returning sigmoid scores of its top-k logits) scales every token *before* the experts, whose
weights are stored ``x W`` (``gate_up_proj: E x hidden x 2I``, ``down_proj: E x I x hidden``; the experts form
``llama4``), plus an always-on ``shared_expert``; elsewhere a gated MLP.  The MLPs name their activation
``activation_fn``.  The latent KV cache is refused: Llama 4's attention rotates q and k with complex RoPE
frequencies, L2-normalizes them on RoPE layers, scales the queries of its NoPE layers by a position-dependent
temperature and chunks attention on RoPE layers, none of which the latent rebuild implements.
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Block, Experts, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import decoder_layers, decoder_layout, gated_mlp
from models.layouts.moe import experts_readers

CONFIGS = ("Llama4TextConfig",)
LATENT_REASON = ("Llama 4's attention (complex RoPE frequencies, L2 q/k norms on RoPE layers, a position-dependent "
                 "query temperature on NoPE layers, chunked attention) has no latent K/V rebuild")


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    blocks = []
    for p, layer, attn in layers:
        fp = join(p, "feed_forward")
        if getattr(layer, "is_moe_layer", False):
            ep = join(fp, "experts")
            experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn",
                              count=config.num_local_experts, router=join(fp, "router"), form="llama4")
            mlp = MLP(fp, "moe", experts_readers(layer.feed_forward.experts, ep, "gate_up_proj"), None,
                      experts=experts, shared=gated_mlp(join(fp, "shared_expert"), act="activation_fn"))
        else:
            mlp = gated_mlp(fp, act="activation_fn")
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=rms(join(p, "input_layernorm")),
                            mlp_norm=rms(join(p, "post_attention_layernorm"))))
    return decoder_layout(model, "llama4", config, base, head, blocks, rms(join(base, "norm")),
                          unsupported=(("latent_cache", LATENT_REASON),))
