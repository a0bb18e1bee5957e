"""Quality of every method x allocation x ratio on a real pretrained LLM (default SmolLM2-135M).

    python benchmarks/llm_quality.py --out docs/results/llm_quality.md

Calibration statistics are collected once (they do not depend on the method) and reused
for every row; each row compresses a fresh copy of the dense model.  Perplexity is the
standard protocol: non-overlapping windows of ``--seq-len`` tokens over each held-out
corpus, exp of the mean next-token NLL.  Also writes the raw rows as JSON beside the table.
"""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import copy
import json
import logging
import sys
import time
from pathlib import Path

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compression import CompressionConfig, collect_stats, compress_  # noqa: E402
from lightning_modules.specs import CausalLMSpec  # noqa: E402


@torch.no_grad()
def perplexity(model, loader) -> float:
    spec = CausalLMSpec(model=model)
    nll, count = 0.0, 0
    for batch in loader:
        n, c = spec._nll(model, batch)
        if not torch.isfinite(n):
            return float("inf")
        nll += float(n)
        count += int(c)
    return float(torch.tensor(nll / count, dtype=torch.float64).exp())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm", "svd_llm_v2"])
    p.add_argument("--allocations", nargs="+", default=["uniform", "v2"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=8192, help="tokens scored per test corpus")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    from data.text import TextDataModule
    from models.causal_lm import load_causal_lm

    dense, tokenizer = load_causal_lm(args.model)
    dense.eval()
    dm = TextDataModule(tokenizer=tokenizer, seq_len=args.seq_len, calibration_samples=args.calib_samples,
                        eval_max_tokens=args.eval_tokens, batch_size=4)
    dm.setup("fit")
    dm.setup("test")
    tests = dict(zip(dm.test_names, dm.test_dataloader()))
    targets = CausalLMSpec(model=dense).default_targets(dense)

    rows = []
    t0 = time.perf_counter()
    dense_ppl = {name: perplexity(dense, loader) for name, loader in tests.items()}
    rows.append({"method": "dense", "allocation": "-", "ratio": 0.0,
                 "params": sum(p.numel() for p in dense.parameters()), "seconds": 0.0, **dense_ppl})
    print(f"dense {dense_ppl} ({time.perf_counter() - t0:.0f} s)", file=sys.stderr)
    t0 = time.perf_counter()
    stats = collect_stats(dense, targets, dm.calibration_dataloader(),
                          forward=CausalLMSpec(model=dense).calibration_forward)
    calib_seconds = time.perf_counter() - t0
    print(f"calibration {calib_seconds:.0f} s", file=sys.stderr)
    for ratio in args.ratios:
        for method in args.methods:
            for allocation in args.allocations:
                model = copy.deepcopy(dense)
                t0 = time.perf_counter()
                report = compress_(model, CompressionConfig(method, ratio=ratio, allocation=allocation,
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
        args.out.write_text(text)
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
        lines.append(f"| {r['method']} | {r['allocation']} | {r['ratio']:.1f} | {r['params']:,} | {ppl} | "
                     f"{r['seconds']:.1f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
