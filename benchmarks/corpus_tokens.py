"""Token counts of every offline text source and split, as the TextDataModule streams them.

    python benchmarks/corpus_tokens.py --out docs/results/corpus_tokens.md

Each count is the length of the source's token stream in :class:`data.text.TextDataModule`
(documents tokenized without special tokens, one EOS between documents), with the SmolLM2
tokenizer by default.  It also checks that the splits of each hash-split corpus are disjoint
(no document text in two splits) and that every held-out test set of
:data:`data.domains.DOMAIN_TESTS` has at least ``--min-test-tokens`` tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.corpora import GENRES, load_documents  # noqa: E402
from data.domains import CORPORA, DOMAIN_TESTS, SPLITS  # noqa: E402
from data.text import TextDataModule  # noqa: E402


def sources() -> list[tuple[str, str]]:
    """``(kind, source)`` of every named offline source and split."""
    rows = [("verse drama", f"shakespeare:{g}") for g in GENRES]
    rows += [("verse drama", "shakespeare:tragedies@val"), ("verse drama", "shakespeare:tragedies@test")]
    rows += [(c.kind, f"{c.name}:{s}") for c in CORPORA.values() for s in SPLITS]
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokenizer", default="smollm2-135m")
    p.add_argument("--min-test-tokens", type=int, default=8192)
    p.add_argument("--out", type=Path, default=None, help="markdown output (a .json beside it)")
    args = p.parse_args()
    start = time.perf_counter()
    dm = TextDataModule(tokenizer=args.tokenizer)
    rows = []
    for kind, source in sources():
        docs, _ = load_documents(source)
        rows.append({"source": source, "kind": kind, "documents": len(docs),
                     "characters": sum(map(len, docs)), "tokens": dm.tokens(source).numel()})
        print(f"{source:<28} {rows[-1]['documents']:>8} docs {rows[-1]['tokens']:>10} tokens", flush=True)
    for name in CORPORA:  # disjointness of the splits, on the texts themselves
        texts = [set(load_documents(f"{name}:{s}")[0]) for s in SPLITS]
        shared = (texts[0] & texts[1]) | (texts[0] & texts[2]) | (texts[1] & texts[2])
        if shared:
            example = next(iter(shared))
            raise SystemExit(f"{name}: {len(shared)} document texts appear in two splits, e.g. {example!r:.80}")
    counts = {r["source"]: r["tokens"] for r in rows}
    short = {d: counts[s] for d, s in DOMAIN_TESTS.items() if counts[s] < args.min_test_tokens}
    if short:
        raise SystemExit(f"held-out test sets under {args.min_test_tokens} tokens: {short}")
    seconds = time.perf_counter() - start
    command = "python benchmarks/corpus_tokens.py" + (f" --out {args.out}" if args.out else "")
    md = render(rows, args, seconds, command)
    print(md)
    if args.out:
        from common import write_keeping_notes  # here: its OpenMP default is not this run's

        write_keeping_notes(args.out, md)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows: list[dict], args, seconds: float, command: str) -> str:
    tests = {s: d for d, s in DOMAIN_TESTS.items()}
    lines = [
        "# Offline text sources: documents, characters and tokens per split",
        "",
        f"Command: `{command}` ({seconds:.0f} s on this machine; Python {platform.python_version()}, "
        f"tokenizer `{args.tokenizer}`).",
        "",
        "Tokens are the length of the source's stream in `TextDataModule` (no special tokens, one EOS between",
        "documents). Splits: Shakespeare by genre (and within a genre by play, `@val` / `@test`); every other",
        "corpus by `sha1(document key) % 10` (0-5 `calib`, 6 `val`, 7-9 `test`; see `data/domains.py`). The",
        "script checks that no document text appears in two splits of a corpus and that every held-out test",
        f"set (**bold**, `data.domains.DOMAIN_TESTS`) has at least {args.min_test_tokens:,} tokens.",
        "`pydoc:` and `pycode:` are read from the running Python's standard library, so their counts",
        "depend on its version.",
        "",
        "| source | kind | documents | characters | tokens |",
        "|---|---|---:|---:|---:|",
    ]
    for r in rows:
        name = f"**`{r['source']}`** ({tests[r['source']]})" if r["source"] in tests else f"`{r['source']}`"
        lines.append(f"| {name} | {r['kind']} | {r['documents']:,} | {r['characters']:,} | {r['tokens']:,} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
