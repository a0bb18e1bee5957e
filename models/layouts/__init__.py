"""Model layouts: one module per family, each turning a model into a :class:`compression.layout.ModelLayout`.

:func:`layout_of` resolves the family from the model's *config class* (never from a module-name substring)
and builds the layout from the live model, so it sees what the model holds now (e.g. experts as 3-D tensors
or as per-expert linears).  Adding a family is one new module here with ``CONFIGS`` (transformers config
class names) and ``build(model, base=..., head=...)``, listed in :data:`FAMILIES`.
"""

from __future__ import annotations

from types import ModuleType

from torch import nn

from compression.layout import ModelLayout
from models.layouts import (
    cohere,
    dbrx,
    deepseek,
    falcon,
    gemma3,
    gemma4,
    glm,
    gpt2,
    gpt_neox,
    gpt_oss,
    llama,
    llama4,
    moe,
    olmo2,
    opt,
    phi,
    phi3,
    qwen3_next,
    starcoder2,
)

FAMILIES: tuple[ModuleType, ...] = (llama, gemma3, gemma4, glm, phi3, moe, llama4, deepseek, qwen3_next, gpt_oss, olmo2,
                                     dbrx, cohere, starcoder2, opt, gpt2, gpt_neox, falcon, phi)


def _config_classes(family: ModuleType) -> tuple[type, ...]:
    import transformers

    return tuple(c for c in (getattr(transformers, n, None) for n in family.CONFIGS) if c is not None)


def family_for_config(config) -> ModuleType:
    """The layout module whose config classes include ``type(config)`` exactly (subclasses of another
    family's config are not assumed to share its module layout)."""
    for family in FAMILIES:
        if type(config) in _config_classes(family):
            return family
    names = ", ".join(n for f in FAMILIES for n in f.CONFIGS)
    raise NotImplementedError(f"no model layout for {type(config).__name__}: compression needs to know where this "
                              f"family's residual stream, norms and projections are. Supported configs: {names}. "
                              "Add a layout module in models/layouts/")


def layout_of(model: nn.Module) -> ModelLayout:
    """The layout of a ``transformers`` causal LM or VLM (see the module docstring)."""
    config = getattr(model, "config", None)
    if config is None:
        raise NotImplementedError(f"{type(model).__name__} has no transformers config; model layouts cover "
                                  "transformers causal LMs and VLMs")
    from models.vlm import family_of

    try:
        family_of(config)
    except ValueError:
        pass  # not a VLM
    else:
        from models.layouts import vlm

        return vlm.build(model)
    if model.get_output_embeddings() is None:
        raise NotImplementedError(f"{type(model).__name__} has no output head; load it with AutoModelForCausalLM")
    return family_for_config(config).build(model)


__all__ = ["FAMILIES", "family_for_config", "layout_of"]
