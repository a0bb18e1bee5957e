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
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

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


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    """``torch.save`` to a temporary sibling, fsync, then rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; cache files are ordinary readable files
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def cached_tensor(path: Path, build: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, bool]:
    """Load the tensor at ``path`` or build, save and return it; the flag says whether it was a hit."""
    if path.is_file():
        try:
            return torch.load(path, weights_only=True), True
        except (RuntimeError, EOFError, OSError) as err:  # unreadable (e.g. disk trouble): rebuild it
            log.warning("token cache %s unreadable (%s); rebuilding", path, err)
    tensor = build()
    atomic_torch_save(tensor, path)
    return tensor, False
