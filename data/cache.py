"""Token caches: keys that name everything the tokens depend on, and atomic writes.

A cached tensor is only valid for one tokenizer, one exact input text and one sampling
recipe, so keys hash all of them:

- :func:`tokenizer_fingerprint` -- the tokenizer class and its full serialized definition
  (vocabulary, merges, normalizer, pre-tokenizer, added tokens) for fast tokenizers, or
  its vocabulary and special tokens otherwise.  Two tokenizers with equal fingerprints
  map every text to the same ids; the folder they were loaded from does not matter.
- :func:`cache_key` -- SHA-256 of a JSON list of such parts (source fingerprints, sample
  count, ``seq_len``, seed, format version).

Files hold plain tensors (``torch.save``, read back with ``weights_only=True``) and are
written to a temporary file in the same folder, then renamed, so a reader sees the
complete file or none.

A cache file that cannot be read back (truncated, overwritten, not a tensor file) or holds
something other than what its key promises (not an integer tensor, the wrong shape, ids
outside the tokenizer's vocabulary) is **rebuilt**, with a warning that names the file and
what was wrong: a cache is derived data, so the right repair is to recompute it, and
refusing would only make the user delete the file by hand.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from compression.io import atomic_torch_save

log = logging.getLogger(__name__)

FORMAT_VERSION = 2  # bump when the meaning of cached tensors changes


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """16 hex chars identifying how ``tokenizer`` maps text to ids."""
    digest = hashlib.sha256(type(tokenizer).__name__.encode() + b"\0")
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode())
    specials = getattr(tokenizer, "special_tokens_map", {})
    digest.update(json.dumps(specials, sort_keys=True, default=str).encode())
    return digest.hexdigest()[:16]


def cache_key(*parts: Any) -> str:
    """16 hex chars of SHA-256 over the JSON of ``parts`` (plus :data:`FORMAT_VERSION`)."""
    blob = json.dumps([FORMAT_VERSION, *parts], sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def token_check(vocab_size: int, ndim: int | None = None,
                shape: tuple[int, ...] | None = None) -> Callable[[Any], None]:
    """A validator for :func:`cached_tensor`: an integer tensor of ``ndim`` dims (or exactly
    ``shape``) whose values are token ids in ``[0, vocab_size)``; raises ``ValueError`` saying what is off."""

    def check(value: Any) -> None:
        if not isinstance(value, torch.Tensor):
            raise ValueError(f"holds a {type(value).__name__}, not a tensor")
        if value.dtype.is_floating_point or value.dtype.is_complex or value.dtype == torch.bool:
            raise ValueError(f"holds a {value.dtype} tensor, not token ids")
        if ndim is not None and value.dim() != ndim:
            raise ValueError(f"holds a {value.dim()}-D tensor, expected {ndim}-D")
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"holds shape {tuple(value.shape)}, expected {tuple(shape)}")
        if value.numel() and (int(value.min()) < 0 or int(value.max()) >= vocab_size):
            raise ValueError(f"holds ids in [{int(value.min())}, {int(value.max())}], outside the tokenizer's "
                             f"vocabulary [0, {vocab_size})")

    return check


def cached_tensor(path: Path, build: Callable[[], torch.Tensor],
                  check: Callable[[Any], None] | None = None) -> tuple[torch.Tensor, bool]:
    """Load the tensor at ``path`` or build, save and return it; the flag says whether it was a hit.

    A file that fails to load, or that ``check`` rejects (by raising ``ValueError``), is
    reported by name and rebuilt (module docstring).
    """
    if path.is_file():
        try:
            value = torch.load(path, weights_only=True)  # never unpickles code: a bad file only fails to load
            if check is not None:
                check(value)
            return value, True
        except Exception as err:  # noqa: BLE001 -- torch.load raises many types on garbage (KeyError, EOFError, ...)
            reason = str(err).strip().splitlines()[0][:200] if str(err).strip() else type(err).__name__
            log.warning("token cache file %s is unusable (%s: %s); rebuilding it", path, type(err).__name__, reason)
    tensor = build()
    if check is not None:
        check(tensor)  # a fresh build that fails its own check is a bug here, not a cache problem
    atomic_torch_save(tensor, path)
    return tensor, False
