"""Choosing calibration batches: evenly spread over a loader, and split into single samples.

Calibration loaders are not shuffled, and a mixed source lists one corpus after the other: "the
first N batches" would all come from the first corpus, so every stage that reads only some batches
(gradient importance, β search, GPTQ Grams) takes them evenly spaced over the loader.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch


def spread_batches(loader: Iterable, max_batches: int | None) -> Iterator[Any]:
    """``max_batches`` batches evenly spaced over ``loader`` (all of them when ``None``).

    A loader without ``len`` gives its first ``max_batches`` batches.
    """
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is None or total is None or max_batches >= total:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            yield batch
        return
    if max_batches <= 0:
        return
    keep = {round(i * (total - 1) / max(max_batches - 1, 1)) for i in range(max_batches)}
    last = max(keep)
    for i, batch in enumerate(loader):
        if i in keep:
            yield batch
        if i >= last:
            return


def split_batch(batch: Any) -> list[Any]:
    """A batch as single-sample batches: dicts of tensors/lists sliced along their first dimension
    (entries of another length are shared), a tensor row by row; anything else stays whole."""
    if torch.is_tensor(batch):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if not isinstance(batch, dict):
        return [batch]
    sizes = {len(v) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0 or isinstance(v, list)}
    if len(sizes) != 1:
        return [batch]
    n = sizes.pop()
    out = []
    for i in range(n):
        sample = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() > 0 and len(value) == n:
                sample[key] = value[i : i + 1]
            elif isinstance(value, list) and len(value) == n:
                sample[key] = value[i : i + 1]
            else:
                sample[key] = value
        out.append(sample)
    return out
