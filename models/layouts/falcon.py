"""Falcon: ``transformer.h.i`` with ``self_attention.query_key_value`` (fused ``FalconLinear``; multi-query:
rows ``[q heads | k | v]``, multi-head: interleaved per head) -> ``self_attention.dense``, and
``mlp.dense_h_to_4h`` -> ``mlp.dense_4h_to_h``.  Parallel attention (default): one ``input_layernorm`` feeds
both the attention and the MLP; the new decoder architecture has ``ln_attn`` / ``ln_mlp``.  LayerNorm."""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout, row_ranges
from models.layouts.common import head_path, join, layer_norm, plain_mlp

CONFIGS = ("FalconConfig",)


def _rows(config, h: int, d: int):
    if config.new_decoder_architecture:
        g = config.num_kv_heads
        per = h // g + 2
        q = tuple((j * per * d + t * d, j * per * d + (t + 1) * d) for j in range(g) for t in range(per - 2))
        return (q, tuple(((j * per + per - 2) * d, (j * per + per - 1) * d) for j in range(g)),
                tuple(((j * per + per - 1) * d, (j * per + per) * d) for j in range(g))), g
    if config.multi_query:
        return row_ranges([h * d, d, d]), 1
    return tuple(tuple((j * 3 * d + part * d, j * 3 * d + (part + 1) * d) for j in range(h)) for part in range(3)), h


def build(model: nn.Module, base: str = "transformer", head: str | None = None) -> ModelLayout:
    decoder = model.get_submodule(base)
    config = model.config
    h = config.num_attention_heads
    d = config.hidden_size // h
    rows, kv = _rows(config, h, d)
    blocks = []
    for i, layer in enumerate(decoder.h):
        p = join(base, "h", str(i))
        ap, mp = join(p, "self_attention"), join(p, "mlp")
        attn = Attention(path=ap, o=join(ap, "dense"), qkv=join(ap, "query_key_value"), qkv_rows=rows, heads=h,
                         kv_heads=kv, head_dim=d, rotary=join(base, "rotary_emb") if config.rotary else None)
        mlp = plain_mlp(mp, "dense_h_to_4h", "act", "dense_4h_to_h")
        if hasattr(layer, "ln_attn"):
            norms = (layer_norm(join(p, "ln_attn")), layer_norm(join(p, "ln_mlp")))
        elif config.parallel_attn:
            norms = (layer_norm(join(p, "input_layernorm")), None)
        else:
            norms = (layer_norm(join(p, "input_layernorm")), layer_norm(join(p, "post_attention_layernorm")))
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=norms[0], mlp_norm=norms[1],
                            parallel=bool(config.parallel_attn)))
    return ModelLayout(
        family="falcon", model_class=type(model).__name__, hidden=config.hidden_size,
        token_embedding=join(base, "word_embeddings"), blocks=tuple(blocks),
        final_norm=layer_norm(join(base, "ln_f")), head=head or head_path(model),
        unsupported=(("latent_cache", "ALiBi attention biases (alibi: true) are not rebuilt by the latent K/V "
                                      "cache"),) if config.alibi else ())
