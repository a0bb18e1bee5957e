"""Quality of block-sequential compression (error propagation) against all-at-once on a real LLM (SmolLM2-135M).

    python benchmarks/sequential_quality.py --calib-samples 32 --out docs/results/sequential_quality.md

All-at-once rows share one set of statistics collected on the dense model (as ``benchmarks/llm_quality.py``);
sequential rows run ``calibration: {mode: sequential, propagate: compressed}`` on a fresh copy: every block is
calibrated on the outputs of the already compressed blocks before it.  Same calibration windows, same
held-out perplexity protocol (non-overlapping windows, exp of the token-mean NLL).  Also reports, per
sequential row, the largest and the last block's output error and the statistics bytes of one block against
all of them.
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
    p.add_argument("--methods", nargs="+", default=["svd_llm"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    setup = lm_setup(args.model, args.seq_len, args.calib_samples, args.eval_tokens)
    dense, tests, targets = setup.model, setup.tests, setup.targets
    batches = list(setup.datamodule.calibration_dataloader())
    rows = [{"method": "dense", "mode": "-", "ratio": 0.0, "seconds": 0.0,
             **{name: perplexity(dense, loader) for name, loader in tests.items()}}]
    t0 = time.perf_counter()
    stats = calibrate(setup)
    calib_seconds = time.perf_counter() - t0
    all_stats = stats.nbytes()
    print(f"calibration {calib_seconds:.0f} s, {all_stats / 2**20:.0f} MiB", file=sys.stderr)
    for ratio in args.ratios:
        for method in args.methods:
            for mode in ("all_at_once", "sequential"):
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                if mode == "all_at_once":
                    report = compress_(model, Recipe(method, ratio=ratio, targets=targets), stats)
                    extra = {"seconds": time.perf_counter() - t0 + calib_seconds, "stats_mib": all_stats / 2**20}
                else:
                    recipe = Recipe(method, ratio=ratio, targets=targets,
                                    calibration={"mode": "sequential", "propagate": "compressed", "progress": False})
                    report = compress_(model, recipe, family=setup.spec, batches=batches)
                    errors = [b["update_error"] for b in report.blocks]
                    extra = {"seconds": time.perf_counter() - t0,
                             "stats_mib": max(b["stats_bytes"] for b in report.blocks) / 2**20,
                             "max_block_error": max(errors), "last_block_error": errors[-1]}
                ppl = {name: perplexity(model, loader) for name, loader in tests.items()}
                rows.append({"method": method, "mode": mode, "ratio": ratio, "params_ratio": report.params_ratio,
                             **extra, **ppl})
                print(rows[-1], file=sys.stderr)
                del model
    command = "python benchmarks/sequential_quality.py " + " ".join(sys.argv[1:])
    text = render(rows, list(tests), args, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows: list[dict], corpora: list[str], args, command: str) -> str:
    head = " | ".join(f"ppl {c}" for c in corpora)
    lines = [
        f"## Quality: all-at-once vs sequential with error propagation ({args.model})",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: {args.calib_samples} windows x {args.seq_len} tokens of the default calibration mix; "
        f"perplexity on {args.eval_tokens} held-out tokens per corpus ({args.seq_len}-token windows). `time` = "
        f"calibration + decomposition wall time on {args.threads} CPU threads (all-at-once: the shared calibration "
        "counted in every row). `stats` = statistics alive at the peak. `block err` = largest / last block's "
        "error relative to its residual update, ‖C - D‖/‖D - H‖ (compressed vs dense block on the calibration "
        "inputs H).",
        "",
        f"| method | mode | ratio | removed | {head} | stats MiB | block err (max / last) | time s |",
        "|---|---|---|---|" + "---|" * len(corpora) + "---|---|---|",
    ]
    for r in rows:
        ppl = " | ".join(f"{r[c]:.2f}" if r[c] < 1e5 else f"{r[c]:.2e}" for c in corpora)
        err = f"{r['max_block_error']:.3f} / {r['last_block_error']:.3f}" if "max_block_error" in r else "-"
        removed = f"{r['params_ratio']:.3f}" if "params_ratio" in r else "-"
        stats = f"{r['stats_mib']:.0f}" if "stats_mib" in r else "-"
        lines.append(f"| {r['method']} | {r['mode']} | {r['ratio']:g} | {removed} | {ppl} | {stats} | {err} | "
                     f"{r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
