"""What compressing costs: calibration and decomposition time, peak memory, Gram sharing.

    python benchmarks/compression_cost.py --out docs/results/compression_cost.md

Each configuration runs in a fresh subprocess (peak RSS is then that configuration's own):
statistics collected with one Gram per distinct input tensor (q/k/v share, gate/up share)
versus one Gram per layer (what the public SVD-LLM code does), then ``svd_llm`` and
``svd_llm_v2`` decompositions at ratio 0.2.
"""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


@torch.no_grad()
def worker(args) -> dict:
    from compression import Recipe, StatsCollector, compress_
    from data.text import TextDataModule
    from lightning_modules.specs import CausalLMSpec
    from models.causal_lm import load_causal_lm

    torch.set_num_threads(args.threads)
    model, tok = load_causal_lm(args.model)
    dm = TextDataModule(tokenizer=tok, seq_len=args.seq_len, calibration_samples=args.calib_samples)
    dm.setup("fit")
    spec = CausalLMSpec(model=model)
    targets = spec.default_targets(model)
    base = rss_mib()
    start = time.perf_counter()
    with StatsCollector(model, targets, share_inputs=args.share) as collector:
        for batch in dm.calibration_dataloader():
            spec.calibration_forward(model, batch)
    stats = collector.stats
    calib_s = time.perf_counter() - start
    calib_peak = rss_mib() - base
    start = time.perf_counter()
    report = compress_(model, Recipe(args.method, ratio=0.2, targets=targets), stats)
    decomp_s = time.perf_counter() - start
    return {
        "share": args.share, "method": args.method, "streams": len(stats.streams), "layers": len(stats.owner),
        "stats_mib": stats.nbytes() / 2**20, "calibration_s": calib_s, "calibration_peak_mib": calib_peak,
        "decomposition_s": decomp_s, "peak_mib": rss_mib() - base, "tokens": next(iter(stats.streams.values())).count,
        "params_ratio": report.params_ratio,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--calib-samples", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--share", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--method", default="svd_llm", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        args.share = bool(args.share)
        print(json.dumps(worker(args)))
        return
    rows = []
    for share, method in ((1, "svd_llm"), (0, "svd_llm"), (1, "svd_llm_v2")):
        cmd = [sys.executable, __file__, "--worker", "--share", str(share), "--method", method, "--model", args.model,
               "--calib-samples", str(args.calib_samples), "--seq-len", str(args.seq_len),
               "--threads", str(args.threads)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(rows[-1], file=sys.stderr)
    command = "python benchmarks/compression_cost.py " + " ".join(sys.argv[1:])
    lines = [
        f"# Compression cost: {args.model}", "", f"Command: `{command}`", "",
        f"{rows[0]['tokens']:,} calibration tokens ({args.calib_samples} x {args.seq_len}), "
        f"{args.threads} CPU threads, "
        "ratio 0.2 over every decoder-layer Linear. Memory = growth of the process's peak RSS after the model and "
        "data are loaded (statistics + decomposition workspace).", "",
        "| statistics | method | input streams / layers | statistics MiB | calibration s | decomposition s | "
        "peak MiB |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        kind = "one Gram per distinct input" if r["share"] else "one Gram per layer"
        lines.append(f"| {kind} | {r['method']} | {r['streams']} / {r['layers']} | {r['stats_mib']:.0f} | "
                     f"{r['calibration_s']:.1f} | {r['decomposition_s']:.1f} | {r['peak_mib']:.0f} |")
    saved = 1 - rows[0]["stats_mib"] / rows[1]["stats_mib"]
    lines += ["", f"Sharing one Gram per input tensor stores {saved:.0%} less statistics memory and runs the float64 "
              f"Gram updates {rows[1]['calibration_s'] / rows[0]['calibration_s']:.2f}x faster here (calibration "
              "includes the model's forward passes)."]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
