"""The layout of a :class:`~models.vit.encoder.VisionEncoder` (DINOv2 or CLIP), as plain data.

Pre-norm encoder blocks, LayerNorm everywhere, separate ``q``/``k``/``v`` projections, a plain
``fc1 -> GELU -> fc2`` MLP (full module names under the encoder's ``model.``)::

    DINOv2  model.encoder.layer.i:                  norm1 -> attention.{q,k,v}_proj -> o_proj,
                                                    norm2 -> mlp.fc1 -> mlp.fc2 (LayerScale on both writes)
    CLIP    model.vision_model.encoder.layers.i:    layer_norm1 -> self_attn.{q,k,v}_proj -> out_proj,
                                                    layer_norm2 -> mlp.fc1 -> mlp.fc2

The stream starts at the patch embedding (plus class token and positions), not at a token embedding,
and ends in the final LayerNorm (DINOv2) or the post-LayerNorm + projection of the class token (CLIP).
Joint q/k/v groups come from the blocks; the residual rotation (LayerNorm subtracts the mean, and
DINOv2's LayerScale sits between each writer and the stream) and the latent K/V cache (an encoder has
no cache) are refused.
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Attention, Block, ModelLayout, Norm

UNSUPPORTED = (
    ("rotation", "LayerNorm subtracts the mean before scaling (and DINOv2's LayerScale sits between each writer and "
                 "the stream), so an orthogonal rotation of the residual stream does not commute with the blocks"),
    ("latent_cache", "an image encoder has no K/V cache"),
)


def vit_layout(encoder: nn.Module) -> ModelLayout:
    """The :class:`~compression.layout.ModelLayout` of a ``VisionEncoder`` (``kind`` ``dinov2`` or ``clip``)."""
    kind = getattr(encoder, "kind", None)
    if kind == "dinov2":
        base, attn_name, o_name, norms = "model.encoder.layer", "attention", "o_proj", ("norm1", "norm2")
        layers = encoder.model.encoder.layer
        embed, final, head = "model.embeddings", "model.layernorm", "model.layernorm"
    elif kind == "clip":
        base, attn_name, o_name = "model.vision_model.encoder.layers", "self_attn", "out_proj"
        norms = ("layer_norm1", "layer_norm2")
        layers = encoder.model.vision_model.encoder.layers
        embed, final = "model.vision_model.embeddings", "model.vision_model.post_layernorm"
        head = "model.visual_projection"
    else:
        raise NotImplementedError(f"no ViT layout for {type(encoder).__name__} (kind {kind!r}); expected a "
                                  "models.vit.VisionEncoder of kind 'dinov2' or 'clip'")
    config = encoder.model.config
    heads = config.num_attention_heads
    blocks = []
    for i in range(len(layers)):
        p = f"{base}.{i}"
        a = f"{p}.{attn_name}"
        attn = Attention(path=a, o=f"{a}.{o_name}", q=f"{a}.q_proj", k=f"{a}.k_proj", v=f"{a}.v_proj", heads=heads,
                         kv_heads=heads, head_dim=config.hidden_size // heads)
        mlp = MLP(f"{p}.mlp", "plain", (f"{p}.mlp.fc1",), f"{p}.mlp.fc2", names=(("fc", "fc1"), ("down", "fc2")))
        blocks.append(Block(path=p, attn=attn, mlp=mlp, attn_norm=Norm(f"{p}.{norms[0]}", "layer"),
                            mlp_norm=Norm(f"{p}.{norms[1]}", "layer")))
    return ModelLayout(family=f"vit-{kind}", model_class=type(encoder.model).__name__, hidden=config.hidden_size,
                       token_embedding=embed, blocks=tuple(blocks), final_norm=Norm(final, "layer"), head=head,
                       unsupported=UNSUPPORTED)
