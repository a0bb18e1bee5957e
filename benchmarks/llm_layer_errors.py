"""Why the methods rank as they do: each layer's calibration output error, method by method.

    python benchmarks/llm_layer_errors.py --ratio 0.2 --out docs/results/llm_layer_errors.md

For a layer ``W`` replaced by ``W'`` the relative output error on the calibration tokens is

    e = ‖(W - W') Xᵀ‖_F / ‖W Xᵀ‖_F = sqrt( tr(ΔW G ΔWᵀ) / tr(W G Wᵀ) ),   G = XᵀX,

computed from the same float64 Gram the whitening methods use, so every method is measured in
the same units (the per-layer ``truncation_loss`` of the report is in each method's own space and
is not comparable across methods).  SVD-LLM minimises exactly this quantity per layer, so no
method can beat it layer by layer at equal rank; the table shows by how much the others lose and
where (which layer types, which depths).
"""

from __future__ import annotations

import json
import logging
import statistics
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import calibrate, lm_parser, lm_setup

from compression import Recipe, allocate, build_method
from compression.targets import layer_type


def output_error(weight: torch.Tensor, approx: torch.Tensor, gram: torch.Tensor) -> float:
    delta = (weight - approx).double()
    num = torch.einsum("ij,jk,ik->", delta, gram, delta)
    den = torch.einsum("ij,jk,ik->", weight.double(), gram, weight.double())
    return float((num / den).clamp_min(0).sqrt())


def main() -> None:
    p = lm_parser(__doc__, eval_tokens=None)
    p.add_argument("--methods", nargs="+", default=["svd", "asvd", "svd_llm", "svd_llm_v2"])
    p.add_argument("--ratio", type=float, default=0.2)
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    setup = lm_setup(args.model, args.seq_len, args.calib_samples)
    model, targets = setup.model, setup.targets
    stats = calibrate(setup)
    ranks = allocate(model, Recipe("svd", ratio=args.ratio, targets=targets), stats).ranks
    errors: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for method_name in args.methods:
            method = build_method(method_name)
            errors[method_name] = {}
            for name in targets:
                w = model.get_submodule(name).weight.detach().double()
                f = method.decompose(w, stats[name], ranks[name], name)
                errors[method_name][name] = output_error(w, f.up @ f.down, stats[name].gram)
            print(method_name, "median", statistics.median(errors[method_name].values()), file=sys.stderr)
    text = render(errors, targets, ranks, args, time.perf_counter() - t0)
    print(text)
    if args.out:
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                             "ranks": ranks, "errors": errors}, indent=1))


def render(errors, targets, ranks, args, seconds) -> str:
    methods = list(errors)
    types = sorted({layer_type(n) for n in targets})
    lines = [
        f"# Per-layer calibration output error: {args.model}, ratio {args.ratio}",
        "",
        f"Command: `python benchmarks/llm_layer_errors.py {' '.join(sys.argv[1:])}` ({seconds:.0f} s)",
        "",
        f"Relative output error `e = ‖(W-W')Xᵀ‖ / ‖W Xᵀ‖` of every targeted layer on {args.calib_samples} x "
        f"{args.seq_len} calibration tokens, each method at the same uniform ranks. `e = 1` means the layer's "
        "output error is as large as its output.",
        "",
        "| method | median e | mean e | max e | layers with e > 0.5 | layers with e > 1 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for m in methods:
        v = list(errors[m].values())
        lines.append(f"| {m} | {statistics.median(v):.3f} | {statistics.fmean(v):.3f} | {max(v):.3f} | "
                     f"{sum(x > 0.5 for x in v)} | {sum(x > 1 for x in v)} |")
    lines += ["", "Mean e per layer type:", "", "| type | " + " | ".join(methods) + " |",
              "|---|" + "---:|" * len(methods)]
    for t in types:
        names = [n for n in targets if layer_type(n) == t]
        cells = " | ".join(f"{statistics.fmean(errors[m][n] for n in names):.3f}" for m in methods)
        lines.append(f"| {t} | {cells} |")
    worst = sorted(targets, key=lambda n: -errors[methods[1] if len(methods) > 1 else methods[0]][n])[:8]
    lines += ["", f"Worst layers for `{methods[1] if len(methods) > 1 else methods[0]}`:", "",
              "| layer | rank | " + " | ".join(methods) + " |", "|---|---:|" + "---:|" * len(methods)]
    for n in worst:
        lines.append(f"| {n} | {ranks[n]} | " + " | ".join(f"{errors[m][n]:.3f}" for m in methods) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
