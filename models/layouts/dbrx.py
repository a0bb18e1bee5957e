"""DBRX (``DbrxForCausalLM``): a mixture-of-experts decoder with a fused, clamped qkv projection and LayerNorms.

``transformer.blocks.i``: ``norm_attn_norm.norm_1`` (LayerNorm without bias) -> ``norm_attn_norm.attn.Wqkv`` (one
fused projection, output rows ``[q | k | v]``, GQA) -> clamp to ``±clip_qkv`` -> RoPE -> attention ->
``norm_attn_norm.attn.out_proj`` -> stream; ``norm_attn_norm.norm_2`` -> ``ffn.router.layer`` (an ``nn.Linear`` to
the expert logits; softmax, top-k, weights normalized by their p-norm) choosing ``ffn.experts``, whose weights are
flat ``E·I x hidden`` parameters ``ffn.experts.mlp.w1`` (gate), ``v1`` (up) and ``w2`` (down, used as ``h w2``):
form ``"dbrx"`` of :func:`compression.forms.linearize_` makes each expert's matrices ``nn.Linear``.  No shared
expert, no dense layers.  Token embedding ``transformer.wte``, final LayerNorm ``transformer.norm_f``, head
``lm_head``.

The clamp acts on the fused projection's output, so factorizing ``Wqkv`` (itself the joint q/k/v factorization) and
rotating its input keep it where it is; the latent KV cache, which rebuilds K/V without a clamp, is refused when
``clip_qkv`` is set (the released checkpoints set 8).  LayerNorm: rotated at the readers.
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Attention, Block, Experts, ModelLayout, row_ranges
from models.layouts.common import eager_of, join, layer_norm
from models.layouts.moe import experts_readers

CONFIGS = ("DbrxConfig",)


def build(model: nn.Module, base: str = "transformer", head: str = "lm_head") -> ModelLayout:
    decoder = model.get_submodule(base)
    config = decoder.config
    attn_config, ffn_config = config.attn_config, config.ffn_config
    heads, kv_heads = config.n_heads, attn_config.kv_n_heads
    head_dim = config.d_model // heads
    rows = row_ranges([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
    blocks = []
    for i, layer in enumerate(decoder.blocks):
        p = join(base, "blocks", str(i))
        nap, fp = join(p, "norm_attn_norm"), join(p, "ffn")
        ap, ep = join(nap, "attn"), join(fp, "experts")
        attn = Attention(path=ap, o=join(ap, "out_proj"), qkv=join(ap, "Wqkv"), qkv_rows=rows, heads=heads,
                         kv_heads=kv_heads, head_dim=head_dim, rotary=join(base, "rotary_emb"),
                         eager=eager_of(layer.norm_attn_norm.attn))
        experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn",
                          count=ffn_config.moe_num_experts, router=join(fp, "router", "layer"), form="dbrx")
        mlp = MLP(fp, "moe", experts_readers(layer.ffn.experts, ep, "gate_up_proj"), None, experts=experts)
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=layer_norm(join(nap, "norm_1")),
                            mlp_norm=layer_norm(join(nap, "norm_2"))))
    unsupported = ()
    if attn_config.clip_qkv is not None:
        unsupported = (("latent_cache", f"clip_qkv: {attn_config.clip_qkv} clamps q, k and v after their fused "
                        "projection; the latent K/V rebuild (and its absorbed value projection) has no clamp"),)
    return ModelLayout(family="dbrx", model_class=type(model).__name__, hidden=config.d_model,
                       token_embedding=join(base, "wte"), blocks=tuple(blocks),
                       final_norm=layer_norm(join(base, "norm_f")), head=head, unsupported=unsupported)
