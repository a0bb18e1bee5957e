"""Which heterogeneous rank allocation helps a whitened LLM: uniform, SVD-LLM V2 weightings, global greedy.

    python benchmarks/llm_allocation.py --ratios 0.2 0.4 --out docs/results/llm_allocation.md

Every row compresses SmolLM2-135M with ``svd_llm`` (the whitened optimum per layer) at the same
parameter budget; only the per-layer ranks differ.  With ``σ_ij`` the whitened singular values of
layer ``i`` (energy ``E_i = Σ_j σ_ij²``) and ``L_i(r) = Σ_{j>r} σ_ij²`` its calibration output
error at rank ``r`` (absolute, squared):

- ``uniform``: every layer at the target ratio;
- ``v2 -log(rel)``: SVD-LLM V2's within-type spread with ``w_i = -log(L_i(r_0)/E_i)`` (the
  library's ``v2``: relative loss, scale-free);
- ``v2 1/log(abs)``: the paper's weighting ``w_i = 1/log L_i(r_0)`` on the absolute loss;
- ``greedy abs``: one global ranking of ``σ_ij² / (m_i + n_i)`` under the budget -- the allocation
  that minimises ``Σ_i L_i``, the summed absolute output error;
- ``greedy rel``: the same on ``σ_ij² / E_i`` -- minimises the summed relative errors;
- ``gradient``: QSVD's importance ``mean_b (σ_i u_iᵀ G_b r_i)²`` from calibration-loss gradients
  (one window per backward), one global ranking per parameter under the budget
  (:func:`compression.gradient_allocation`) -- the loss's own first-order sensitivity.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import calibrate, lm_parser, lm_setup, perplexity, single_windows

from compression import Recipe, build_method, compress_, gradient_importance
from compression.gradient_allocation import lm_loss

SCHEMES = {"uniform": "uniform", "v2 -log(rel)": "v2", "v2 1/log(abs)": "v2_paper", "greedy abs": "greedy",
           "greedy rel": "greedy_relative", "gradient": "gradient"}


def main() -> None:
    p = lm_parser(__doc__)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    p.add_argument("--grad-samples", type=int, default=16, help="calibration windows for the gradient importance")
    p.add_argument("--grad-windows", choices=["spread", "first"], default="spread",
                   help="gradient windows evenly spread over the calibration mix, or the first ones (all comedies)")
    p.add_argument("--schemes", nargs="+", default=None, help="subset of schemes to run (default: all)")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    setup = lm_setup(args.model, args.seq_len, args.calib_samples, args.eval_tokens)
    dense, tests, targets = setup.model, setup.tests, setup.targets
    stats = calibrate(setup)
    method = build_method("svd_llm")
    with torch.no_grad():
        spectra = {n: method.spectrum(dense.get_submodule(n).weight, stats[n], n).cpu() for n in targets}
    rows = [{"scheme": "dense", "ratio": 0.0, **{k: perplexity(dense, v) for k, v in tests.items()}}]
    importance = None
    if args.schemes is None or "gradient" in args.schemes:
        windows = single_windows(setup, args.grad_samples, first=args.grad_windows == "first")
        importance = gradient_importance(dense, targets, windows, lm_loss, method, stats)
    for ratio in args.ratios:
        for name, allocation in SCHEMES.items():
            if (args.schemes is not None and name not in args.schemes) or (name == "gradient" and importance is None):
                continue
            model = copy.deepcopy(dense)
            report = compress_(model, Recipe("svd_llm", ratio=ratio, targets=targets, allocation=allocation), stats,
                               importances=importance)
            ranks = {r.name: r.rank for r in report.layers}
            rows.append({"scheme": name, "ratio": ratio, "params_ratio": report.params_ratio,
                         "sum_abs_loss": sum(float(spectra[n][ranks[n]:].double().square().sum()) for n in targets),
                         "min_rank": min(ranks.values()), "max_rank": max(ranks.values()),
                         **{k: perplexity(model, v) for k, v in tests.items()}})
            print(rows[-1], file=sys.stderr)
            del model
    text = render(rows, list(tests), args, time.perf_counter() - t_start)
    print(text)
    if args.out:
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=1))


def render(rows, corpora, args, seconds) -> str:
    lines = [f"# Rank allocation for whitened compression: {args.model}", "",
             f"Command: `python benchmarks/llm_allocation.py {' '.join(sys.argv[1:])}` ({seconds / 60:.0f} min)", "",
             f"Method `svd_llm` everywhere; calibration {args.calib_samples} x {args.seq_len} tokens (default mix); "
             f"perplexity on {args.eval_tokens} held-out tokens per corpus. `Σ L` = summed squared calibration "
             "output error over all layers (whitened tail energy).", "",
             "| scheme | ratio | removed | ranks | Σ L | " + " | ".join(f"ppl {c}" for c in corpora) + " |",
             "|---|---:|---:|---|---:|" + "---:|" * len(corpora)]
    for r in rows:
        if r["scheme"] == "dense":
            lines.append("| dense | 0 | - | - | - | " + " | ".join(f"{r[c]:.2f}" for c in corpora) + " |")
            continue
        lines.append(f"| {r['scheme']} | {r['ratio']:.1f} | {r['params_ratio']:.4f} | {r['min_rank']}..{r['max_rank']} "
                     f"| {r['sum_abs_loss']:.4g} | " + " | ".join(f"{r[c]:.2f}" for c in corpora) + " |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
