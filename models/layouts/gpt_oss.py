"""GPT-OSS (``GptOssForCausalLM``): LLaMA's blocks with a mixture of experts and attention sinks.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` (biases) -> RoPE -> attention with a learned
sink logit per head -> ``o_proj`` (bias) -> stream; ``post_attention_layernorm`` -> ``mlp.router`` (weight and
bias, softmax over the top-k logits) choosing ``mlp.experts``: 3-D tensors stored as ``x W + b`` with biases,
gate and up interleaved, a clamped SwiGLU (form ``"gpt_oss"`` of :func:`compression.forms.linearize_`, which
makes each expert matrix an ``nn.Linear`` with its bias).  Sliding and full layers alternate.

The latent KV cache keeps the sink logits (the attention's ``sinks`` parameter stays on the swapped module, and
the decode-step value fold scales the value bias by the weights left after the sink) and rotates with the family's
own RoPE function (half-width cos/sin).
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Block, Experts, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import decoder_layers, decoder_layout
from models.layouts.moe import experts_readers

CONFIGS = ("GptOssConfig",)


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base)
    blocks = []
    for p, layer, attn in layers:
        mp = join(p, "mlp")
        ep = join(mp, "experts")
        experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn",
                          count=config.num_local_experts, router=join(mp, "router"), form="gpt_oss")
        mlp = MLP(mp, "moe", experts_readers(layer.mlp.experts, ep, "gate_up_proj"), None, experts=experts)
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=rms(join(p, "input_layernorm")),
                            mlp_norm=rms(join(p, "post_attention_layernorm"))))
    return decoder_layout(model, "gpt_oss", config, base, head, blocks, rms(join(base, "norm")))
