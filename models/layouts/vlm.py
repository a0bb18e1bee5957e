"""The language model of a VLM (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Gemma 3 / 4, ...) as a decoder layout.

The decoder is the VLM's language model (``vlm_parts``), laid out by its text config's family; besides the
token embedding, the projector's output layer writes into the residual stream (its output replaces the image
placeholder embeddings), Qwen3-VL's deepstack mergers add to it after the first layers, and LLaVA-NeXT's learned
``image_newline`` vector is placed in it.  The vision
tower's attentions (separate q/k/v) are listed as extra joint groups; the tower itself does not read the stream.
"""

from __future__ import annotations

from torch import nn

from compression.layout import ModelLayout


def _writers(model: nn.Module, family) -> tuple[str, ...]:
    """The projector's output layer and, for each listed module list, the writer of every element."""
    out = [family.projector_out] if family.projector_out else []
    for path, sub in family.writer_lists:
        out += [f"{path}.{i}.{sub}" for i in range(len(model.get_submodule(path)))]
    return tuple(out)


def _qkv_linears(attn: nn.Module) -> tuple[str, ...] | None:
    """The q/k/v linears of a vision attention (relative names), or ``None``.  Gemma 4 wraps each in a
    ``Gemma4ClippableLinear`` (``.linear`` inside): the inner linears form the group when the wrappers clamp nothing
    (then all three read the attention's input itself); with ``use_clipped_linears`` each reads its own clamped
    copy, so they are no group and are factorized one by one."""
    qkv = ("q_proj", "k_proj", "v_proj")
    parts = [getattr(attn, a, None) for a in qkv]
    if not all(isinstance(p, nn.Module) for p in parts):
        return None
    if all(isinstance(p, nn.Linear) for p in parts):
        return qkv
    if all(isinstance(getattr(p, "linear", None), nn.Linear) and not getattr(p, "use_clipped_linears", True)
           for p in parts):
        return tuple(f"{a}.linear" for a in qkv)
    return None


def build(model: nn.Module) -> ModelLayout:
    from models.layouts import family_for_config
    from models.vlm import family_of, vlm_parts

    family = family_of(model)
    parts = vlm_parts(model)
    lm = model.get_submodule(parts["language_model"])
    layout = family_for_config(lm.config).build(model, base=parts["language_model"], head=parts["lm_head"])
    tower = model.get_submodule(parts["vision_tower"])
    prefix = parts["vision_tower"]
    groups = tuple((f"{prefix}.{n}", tuple(f"{prefix}.{n}.{a}" for a in members)) for n, m in tower.named_modules()
                   if (members := _qkv_linears(m)))
    return type(layout)(**{**layout.__dict__, "model_class": type(model).__name__,
                           "writers": _writers(model, family),
                           "stream_vectors": family.stream_vectors,
                           "extra_joint_groups": groups})
