"""Quality of every method x allocation x ratio on a real pretrained LLM (default SmolLM2-135M).

    python benchmarks/llm_quality.py --out docs/results/llm_quality.md

Calibration statistics are collected once (they do not depend on the method) and reused
for every row; each row compresses a fresh copy of the dense model.  Perplexity is the
standard protocol: non-overlapping windows of ``--seq-len`` tokens over each held-out
corpus, exp of the mean next-token NLL.  Also writes the raw rows as JSON beside the table.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import calibrate, lm_parser, lm_setup, perplexity

from compression import Recipe, compress_


def main() -> None:
    p = lm_parser(__doc__)
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm", "svd_llm_v2"])
    p.add_argument("--allocations", nargs="+", default=["uniform", "v2"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    setup = lm_setup(args.model, args.seq_len, args.calib_samples, args.eval_tokens)
    dense, tests, targets = setup.model, setup.tests, setup.targets

    rows = []
    t0 = time.perf_counter()
    dense_ppl = {name: perplexity(dense, loader) for name, loader in tests.items()}
    rows.append({"method": "dense", "allocation": "-", "ratio": 0.0,
                 "params": sum(p.numel() for p in dense.parameters()), "seconds": 0.0, **dense_ppl})
    print(f"dense {dense_ppl} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    t0 = time.perf_counter()
    stats = calibrate(setup)
    calib_seconds = time.perf_counter() - t0
    print(f"calibration {calib_seconds:.0f} s", file=sys.stderr)
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                report = compress_(model, Recipe(method, ratio=ratio, allocation=allocation,
                                                            targets=targets), stats)
                seconds = time.perf_counter() - t0
                ppl = {name: perplexity(model, loader) for name, loader in tests.items()}
                rows.append({"method": method, "allocation": allocation, "ratio": ratio,
                             "params": report.model_params_after, "params_ratio": report.params_ratio,
                             "seconds": seconds, **ppl})
                print(rows[-1], file=sys.stderr)
                del model
    command = "python benchmarks/llm_quality.py " + " ".join(sys.argv[1:])
    text = render(rows, list(tests), args, command, calib_seconds)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows, corpora, args, command, calib_seconds) -> str:
    head = " | ".join(f"ppl {c}" for c in corpora)
    lines = [
        f"# Compression quality: {args.model}",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: {args.calib_samples} windows x {args.seq_len} tokens from the default calibration mix "
        f"(collected once in {calib_seconds:.0f} s, shared by all rows). Perplexity: non-overlapping "
        f"{args.seq_len}-token windows, {args.eval_tokens} tokens per corpus. `time` = decomposition wall time "
        f"on {args.threads} CPU threads. Ratio = fraction of the targeted (decoder-layer) parameters removed.",
        "",
        f"| method | allocation | ratio | params | {head} | time s |",
        "|---|---|---|---|" + "---|" * len(corpora) + "---|",
    ]
    for r in rows:
        ppl = " | ".join(f"{r[c]:.2f}" if r[c] < 1e5 else f"{r[c]:.2e}" for c in corpora)
        lines.append(f"| {r['method']} | {r['allocation']} | {r['ratio']:g} | {r['params']:,} | {ppl} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
