"""Reading JSON and JSONL data files with errors that name the file and the line.

``json.load`` reports ``Expecting ',' delimiter: line 3 column 9 (char 41)`` -- without the
file, and a JSONL reader that calls ``json.loads`` per line reports ``line 1`` for every bad
line.  These helpers turn any parse failure into one :class:`DataFileError` (a
``ValueError``) of the form ``<path>:<line>:<column>: not valid JSON (<reason>)`` with the
line's position in the *file*, so a person can open the file at that line.  Nothing is
executed or unpickled: JSON only.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any


class DataFileError(ValueError):
    """A data file that cannot be parsed; the message names the file (and line when known)."""


def _located(path: Path | str, line: int, column: int, reason: str, what: str) -> DataFileError:
    return DataFileError(f"{path}:{line}:{column}: not valid {what} ({reason}); fix or replace this file")


def load_json(path: str | Path, what: str = "JSON") -> Any:
    """The value of one JSON file; a parse error names ``path:line:column``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise DataFileError(f"{path}: not UTF-8 text ({err}); {what} files must be UTF-8") from err
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise _located(path, err.lineno, err.colno, err.msg, what) from err


def iter_jsonl(path: str | Path, what: str = "JSONL") -> Iterator[tuple[int, Any]]:
    """``(line number, value)`` of every non-blank line of a JSON-lines file (1-based lines)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist")
    with open(path, "rb") as f:  # bytes, decoded per line: a bad byte is reported on its own line
        yield from iter_jsonl_lines(f, str(path), what)


def iter_jsonl_lines(lines: Iterable[bytes], label: str, what: str = "JSONL") -> Iterator[tuple[int, Any]]:
    """:func:`iter_jsonl` over raw lines (e.g. a member of an archive); ``label`` names them in errors."""
    for lineno, raw in enumerate(lines, start=1):
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataFileError(f"{label}:{lineno}: not UTF-8 text ({err}); {what} files must be UTF-8") from err
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as err:
            raise _located(label, lineno, err.colno, err.msg, what) from err


def load_jsonl(path: str | Path, what: str = "JSONL") -> list[Any]:
    """Every value of a JSON-lines file, in order."""
    return [value for _, value in iter_jsonl(path, what)]


__all__ = ["DataFileError", "iter_jsonl", "iter_jsonl_lines", "load_json", "load_jsonl"]
