"""Helpers shared by the family layouts: paths, the family's eager attention, sliding windows."""

from __future__ import annotations

import sys
from collections.abc import Callable

from torch import nn

from compression.layout import MLP, Norm


def join(*parts: str) -> str:
    return ".".join(p for p in parts if p)


def decoder_of(model: nn.Module, base: str) -> tuple[object, list[tuple[str, nn.Module]]]:
    """``(config, [(layer path, layer)])``: the config of the decoder at ``base`` and its ``base.layers.i``."""
    decoder = model.get_submodule(base)
    return decoder.config, [(join(base, "layers", str(i)), layer) for i, layer in enumerate(decoder.layers)]


def plain_mlp(path: str, fc: str, act: str, down: str) -> MLP:
    """The MLP ``down(act(fc(x)))`` at ``path``, its three parts named as the family names them."""
    return MLP(path, "plain", (join(path, fc),), join(path, down), names=(("fc", fc), ("act", act), ("down", down)))


def eager_of(attn: nn.Module) -> Callable | None:
    """The eager attention function defined next to ``attn``'s class in its transformers module."""
    return getattr(sys.modules[type(attn).__module__], "eager_attention_forward", None)


def rope_of(attn: nn.Module) -> Callable:
    """The ``apply_rotary_pos_emb`` defined next to ``attn``'s class in its transformers module."""
    fn = getattr(sys.modules[type(attn).__module__], "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(f"{type(attn).__name__}: no apply_rotary_pos_emb next to it in "
                                  f"{type(attn).__module__}")
    return fn


def sliding_kwargs(attn: nn.Module, config, source: str | None) -> tuple[tuple[str, object], ...]:
    """``(("sliding_window", w),)`` when this family's attention passes a window to the attention function:
    ``source="module"``: ``attn.sliding_window`` (per layer, ``None`` on full layers: Qwen2, Qwen3, Gemma3);
    ``"config"``: ``config.sliding_window`` on every layer (Mistral, Mixtral, Phi-3); ``None``: never (LLaMA,
    Qwen2-MoE, whose windows live in the attention mask only)."""
    if source == "module":
        window = getattr(attn, "sliding_window", None)
    elif source == "config":
        window = getattr(config, "sliding_window", None)
    else:
        window = None
    return (("sliding_window", int(window)),) if window is not None else ()


def rms(path: str, offset: float = 0.0) -> Norm:
    return Norm(path, "rms", offset)


def layer_norm(path: str) -> Norm:
    return Norm(path, "layer")


def head_path(model: nn.Module) -> str:
    head = model.get_output_embeddings()
    return next(n for n, m in model.named_modules() if m is head)


