"""Refuse a tokenizer whose ids the model cannot embed.

A causal LM looks token ids up in its input embedding (``[V_in, d]``) and scores them with
its output head (``[V_out, d]``).  An id ``>= V_in`` is an index error on CPU and an
unchecked out-of-bounds read (or a device assert) on CUDA; an id ``>= V_out`` used as a label
makes the cross-entropy fail or read garbage.  A tokenizer with more entries than the
embedding has rows (``len(tokenizer) > min(V_in, V_out)``) means the data and the model come
from different families -- a silent wrong result waiting to happen even when the ids seen so
far are small.  A model with *more* rows than the tokenizer is fine (vocabularies are often
padded to a multiple of 64).

:func:`check_vocabulary` is called once both the model and the data exist (e.g. from the
LightningModule's ``setup`` or a callback's ``on_fit_start``, after ``configure_model``);
``TextDataModule.check_model`` / ``InstructionDataModule.check_model`` call it with their own
tokenizer and the ids they hold.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_name(model: nn.Module) -> str:
    """What to call a model in a message: its config's ``_name_or_path``, else its class."""
    config = getattr(model, "config", None)
    name = getattr(config, "_name_or_path", "") or getattr(config, "name_or_path", "")
    return f"{name} ({type(model).__name__})" if name else type(model).__name__


def tokenizer_name(tokenizer: Any) -> str:
    name = getattr(tokenizer, "name_or_path", "")
    return f"{name} ({type(tokenizer).__name__})" if name else type(tokenizer).__name__


def embedding_rows(model: nn.Module) -> dict[str, int]:
    """Rows of the model's input embedding and (when it has one) output head: ``{"input": V_in, "output": V_out}``."""
    rows: dict[str, int] = {}
    get_in = getattr(model, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if emb is None:
        raise TypeError(f"{model_name(model)} has no get_input_embeddings(); cannot check its vocabulary")
    rows["input"] = int(emb.num_embeddings if hasattr(emb, "num_embeddings") else emb.weight.shape[0])
    get_out = getattr(model, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    if head is not None and getattr(head, "weight", None) is not None:
        rows["output"] = int(head.out_features if hasattr(head, "out_features") else head.weight.shape[0])
    return rows


def check_vocabulary(tokenizer: Any, model: nn.Module, token_ids: torch.Tensor | None = None,
                     tokenizer_label: str | None = None, model_label: str | None = None) -> None:
    """Raise ``ValueError`` (naming both) if ``model`` cannot embed what ``tokenizer`` produces.

    Args:
        tokenizer: the data's tokenizer (``len(tokenizer)`` counts added tokens too).
        model: a model with ``get_input_embeddings()`` (any ``transformers`` model).
        token_ids: ids the data will feed (any shape; negative values such as the -100 label
            padding are ignored), checked against the embedding rows.
        tokenizer_label / model_label: how to name them (default: their ``name_or_path`` and class).
    """
    tok = tokenizer_label or tokenizer_name(tokenizer)
    mod = model_label or model_name(model)
    rows = embedding_rows(model)
    limit = min(rows.values())
    where = " and ".join(f"{k} embedding {v} rows" for k, v in rows.items())
    size = len(tokenizer)
    if size > limit:
        raise ValueError(f"tokenizer {tok} has {size} tokens but model {mod} has {where}: they do not belong "
                         "together; use the model's own tokenizer (data.tokenizer = the model's name_or_path)")
    if token_ids is not None and token_ids.numel():
        ids = token_ids[token_ids >= 0]
        top = int(ids.max()) if ids.numel() else -1
        if top >= limit:
            raise ValueError(f"the data holds token id {top} (tokenizer {tok}) but model {mod} has {where}; "
                             "the token cache or the tokenizer does not match this model")


__all__ = ["check_vocabulary", "embedding_rows", "model_name", "tokenizer_name"]
