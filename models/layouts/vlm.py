"""The language model of a VLM (LLaVA, LLaVA-NeXT, Idefics3/SmolVLM, Gemma 3) as a decoder layout.

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


def build(model: nn.Module) -> ModelLayout:
    from models.layouts import family_for_config
    from models.vlm import family_of, vlm_parts

    family = family_of(model)
    parts = vlm_parts(model)
    lm = model.get_submodule(parts["language_model"])
    layout = family_for_config(lm.config).build(model, base=parts["language_model"], head=parts["lm_head"])
    tower = model.get_submodule(parts["vision_tower"])
    qkv, prefix = ("q_proj", "k_proj", "v_proj"), parts["vision_tower"]
    groups = tuple((f"{prefix}.{n}", tuple(f"{prefix}.{n}.{a}" for a in qkv)) for n, m in tower.named_modules()
                   if all(isinstance(getattr(m, a, None), nn.Module) for a in qkv))
    return type(layout)(**{**layout.__dict__, "model_class": type(model).__name__,
                           "writers": _writers(model, family),
                           "stream_vectors": family.stream_vectors,
                           "extra_joint_groups": groups})
