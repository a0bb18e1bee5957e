"""GPT-2: ``transformer.h.i`` with ``ln_1`` -> ``attn.c_attn`` (one fused ``Conv1D``, rows ``[q | k | v]`` of
the transposed weight) -> ``attn.c_proj`` and ``ln_2`` -> ``mlp.c_fc`` -> act -> ``mlp.c_proj``; learned
positions (``wpe``); LayerNorm; ``Conv1D`` stores ``W`` as ``in x out`` (``y = x W + b``)."""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout, row_ranges
from models.layouts.common import eager_of, head_path, join, layer_norm, plain_mlp

CONFIGS = ("GPT2Config",)


def build(model: nn.Module, base: str = "transformer", head: str | None = None) -> ModelLayout:
    decoder = model.get_submodule(base)
    config = model.config
    e, h = config.n_embd, config.n_head
    blocks = []
    for i, layer in enumerate(decoder.h):
        p = join(base, "h", str(i))
        ap, mp = join(p, "attn"), join(p, "mlp")
        attn = Attention(path=ap, o=join(ap, "c_proj"), qkv=join(ap, "c_attn"), qkv_rows=row_ranges([e, e, e]),
                         heads=h, kv_heads=h, head_dim=e // h, eager=eager_of(layer.attn), nope=True)
        mlp = plain_mlp(mp, "c_fc", "act", "c_proj")
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=layer_norm(join(p, "ln_1")),
                            mlp_norm=layer_norm(join(p, "ln_2"))))
    return ModelLayout(
        family="gpt2", model_class=type(model).__name__, hidden=e, token_embedding=join(base, "wte"),
        blocks=tuple(blocks), final_norm=layer_norm(join(base, "ln_f")), head=head or head_path(model),
        position_embeddings=(join(base, "wpe"),),
        unsupported=(("latent_cache", "reorder_and_upcast_attn: true computes the eager attention in its own order, "
                                      "which the latent K/V cache does not reproduce"),)
        if config.reorder_and_upcast_attn else ())
