"""GPT-NeoX (Pythia): ``gpt_neox.layers.i`` with ``input_layernorm`` -> ``attention.query_key_value`` (fused,
rows interleaved per head: ``[q_h | k_h | v_h]`` for each head ``h``) -> ``attention.dense`` and
``post_attention_layernorm`` -> ``mlp.dense_h_to_4h`` -> ``mlp.dense_4h_to_h``; parallel residual by default
(``x + attn(ln1(x)) + mlp(ln2(x))``); partial rotary; LayerNorm; head ``embed_out``."""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import decoder_of, eager_of, head_path, join, layer_norm, plain_mlp

CONFIGS = ("GPTNeoXConfig",)


def build(model: nn.Module, base: str = "gpt_neox", head: str | None = None) -> ModelLayout:
    config, layers = decoder_of(model, base)
    h = config.num_attention_heads
    d = config.hidden_size // h
    rows = tuple(tuple((j * 3 * d + part * d, j * 3 * d + (part + 1) * d) for j in range(h)) for part in range(3))
    blocks = []
    for p, layer in layers:
        ap, mp = join(p, "attention"), join(p, "mlp")
        attn = Attention(path=ap, o=join(ap, "dense"), qkv=join(ap, "query_key_value"), qkv_rows=rows, heads=h,
                         kv_heads=h, head_dim=d, rotary=join(base, "rotary_emb"), eager=eager_of(layer.attention))
        mlp = plain_mlp(mp, "dense_h_to_4h", "act", "dense_4h_to_h")
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=layer_norm(join(p, "input_layernorm")),
                            mlp_norm=layer_norm(join(p, "post_attention_layernorm")),
                            parallel=bool(config.use_parallel_residual)))
    return ModelLayout(
        family="gpt_neox", model_class=type(model).__name__, hidden=config.hidden_size,
        token_embedding=join(base, "embed_in"), blocks=tuple(blocks),
        final_norm=layer_norm(join(base, "final_layer_norm")), head=head or head_path(model))
