"""Where a model's residual stream lives: the decoder, its layers, the output head and what else writes into it.

Found structurally, never by model name: the decoder is the module that owns
``model.get_input_embeddings()`` as ``embed_tokens`` and has ``layers`` and a final ``norm``
(``model`` of a LLaMA-family causal LM, ``model.language_model`` of LLaVA / LLaVA-NeXT,
``model.text_model`` of Idefics3); the head is ``model.get_output_embeddings()``.  Besides the
token embedding, a VLM writes into the stream through its projector (whose output replaces the
image placeholder embeddings) and, in LLaVA-NeXT, a learned ``image_newline`` vector
(:func:`stream_writers`).  Used by :mod:`compression.rotation`.
"""

from __future__ import annotations

from torch import nn

from compression.lowrank import LowRankLinear


def language_model(model: nn.Module) -> tuple[str, nn.Module]:
    """``(name, module)`` of the decoder that owns the input embedding as ``embed_tokens`` and has
    ``layers`` and a final ``norm``: ``model`` of a causal LM, ``model.language_model`` of LLaVA,
    ``model.text_model`` of Idefics3 -- found by identity with ``get_input_embeddings()``."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    for name, module in model.named_modules():
        if (emb is not None and getattr(module, "embed_tokens", None) is emb and hasattr(module, "layers")
                and hasattr(module, "norm")):
            return name, module
    raise ValueError(f"{type(model).__name__} has no decoder owning its input embedding (embed_tokens, layers, norm); "
                     "rotation supports LLaMA-family language models and VLMs built on them")


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    return list(language_model(model)[1].layers)


def language_model_module(model: nn.Module) -> nn.Module:
    return language_model(model)[1]


def output_head(model: nn.Module) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise ValueError(f"{type(model).__name__} has no output embedding (lm_head) to rotate")
    return head


def _parameterized_leaves(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """Modules holding parameters, in registration order; a LowRankLinear counts as one leaf."""
    out, inside = [], ()
    for n, m in module.named_modules():
        if inside and n.startswith(inside):
            continue
        if isinstance(m, LowRankLinear):
            out.append((n, m))
            inside = f"{n}."
        elif not list(m.children()) and any(True for _ in m.parameters(recurse=False)):
            out.append((n, m))
    return out


def stream_writers(model: nn.Module) -> dict[str, list[str]]:
    """What writes into the language model's residual stream besides the token embedding.

    Returns ``{"linears": [...], "vectors": [...]}``: module names whose *output* feeds the stream
    (the last layer of a VLM projector) and parameter names of learned vectors placed in it
    (LLaVA-NeXT's ``image_newline``).  Found structurally among the siblings of the decoder
    (the children of its parent, minus the output head): a sibling containing a convolution is a
    vision encoder (it reads pixels, not the stream) and is left alone; any other sibling with
    parameters is a projector whose last parameterized leaf must be an ``nn.Linear`` producing
    ``hidden`` features; the parent's own 1-D parameters of size ``hidden`` are stream vectors.
    A plain causal LM has none of these.
    """
    lm_name, lm = language_model(model)
    parent_name = lm_name.rpartition(".")[0]
    parent = model.get_submodule(parent_name) if parent_name else model
    prefix = f"{parent_name}." if parent_name else ""
    hidden = lm.embed_tokens.weight.shape[1]
    head = output_head(model)
    linears, vectors = [], []
    for child_name, child in parent.named_children():
        if child is lm or child is head or not any(True for _ in child.parameters()):
            continue
        if any(isinstance(m, nn.modules.conv._ConvNd) for m in child.modules()):
            continue  # a vision encoder
        leaves = _parameterized_leaves(child)
        last_name, last = leaves[-1]
        if not isinstance(last, (nn.Linear, LowRankLinear)) or last.out_features != hidden:
            raise ValueError(f"{prefix}{child_name} looks like a projector into the residual stream but its last layer "
                             f"{last_name!r} is a {type(last).__name__}, not an nn.Linear with {hidden} outputs; name "
                             "what writes into the stream: rotate_model_(..., writers={'linears': [...], "
                             "'vectors': [...]})")
        linears.append(f"{prefix}{child_name}.{last_name}")
    for pname, p in parent.named_parameters(recurse=False):
        if p.dim() == 1 and p.shape[0] == hidden:
            vectors.append(f"{prefix}{pname}")
    return {"linears": linears, "vectors": vectors}


__all__ = ["decoder_layers", "language_model", "language_model_module", "output_head", "stream_writers"]
