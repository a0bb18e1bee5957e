"""OPT: ``model.decoder.layers.i`` with ``self_attn_layer_norm`` -> ``self_attn.{q,k,v}_proj`` -> ``out_proj``
and ``final_layer_norm`` -> ``fc1`` -> act -> ``fc2`` on the layer itself; learned positions
(``embed_positions``) add to the stream; LayerNorm everywhere (biases).  The MLP has no module of its own, so
rotation's online Hadamard before ``fc2`` rides on ``activation_fn`` (:class:`compression.rotation.HadamardAfterAct`).
OPT-350m (post-norm, projected embeddings) is refused for rotation."""

from __future__ import annotations

from torch import nn

from compression.layout import Attention, Block, ModelLayout
from models.layouts.common import decoder_of, eager_of, head_path, join, layer_norm, plain_mlp

CONFIGS = ("OPTConfig",)


def build(model: nn.Module, base: str = "model.decoder", head: str | None = None) -> ModelLayout:
    config, layers = decoder_of(model, base)
    blocks = []
    for p, layer in layers:
        ap = join(p, "self_attn")
        d = config.hidden_size // config.num_attention_heads
        attn = Attention(path=ap, o=join(ap, "out_proj"), q=join(ap, "q_proj"), k=join(ap, "k_proj"),
                         v=join(ap, "v_proj"), heads=config.num_attention_heads, kv_heads=config.num_attention_heads,
                         head_dim=d, eager=eager_of(layer.self_attn), nope=True, prescaled_queries=True)
        mlp = plain_mlp(p, "fc1", "activation_fn", "fc2")
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=layer_norm(join(p, "self_attn_layer_norm")),
                            mlp_norm=layer_norm(join(p, "final_layer_norm"))))
    unsupported = []
    if not config.do_layer_norm_before or getattr(model.get_submodule(base), "project_in", None) is not None:
        unsupported.append(("rotation", "post-norm blocks or a projected embedding (project_in/project_out) sit "
                                        "between the stream and its readers"))
    return ModelLayout(family="opt", model_class=type(model).__name__, hidden=config.hidden_size,
                       token_embedding=join(base, "embed_tokens"), blocks=tuple(blocks),
                       final_norm=layer_norm(join(base, "final_layer_norm")), head=head or head_path(model),
                       position_embeddings=(join(base, "embed_positions"),), unsupported=tuple(unsupported))
