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
import math
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import calibrate, lm_parser, lm_setup, perplexity, single_windows

from compression import CompressionConfig, build_method, compress_, gradient_allocation, gradient_importance
from compression.allocation import _spread
from compression.gradient_allocation import lm_loss
from compression.lowrank import rank_for_ratio
from compression.targets import layer_type


def spread_by_type(shapes, weights, ratio, max_ratio=0.95) -> dict[str, int]:
    groups: dict[str, list[str]] = {}
    for n in shapes:
        groups.setdefault(layer_type(n), []).append(n)
    ratios: dict[str, float] = {}
    for members in groups.values():
        ratios.update(_spread({n: weights[n] for n in members}, {n: shapes[n][0] * shapes[n][1] for n in members},
                              ratio, max_ratio))
    return {n: rank_for_ratio(*shapes[n], ratios[n]) for n in shapes}


def greedy(shapes, spectra, ratio, normalise: bool) -> dict[str, int]:
    budget = (1 - ratio) * sum(m * n for m, n in shapes.values())
    ranks = dict.fromkeys(shapes, 1)
    used = sum(m + n for m, n in shapes.values())
    cands = []
    for name, s in spectra.items():
        energy = s.double().square()
        scale = float(energy.sum()) if normalise else 1.0
        m, n = shapes[name]
        cands += [(float(e) / scale / (m + n), name, j) for j, e in enumerate(energy.tolist()) if j >= 1]
    cands.sort(key=lambda t: -t[0])
    for _, name, j in cands:  # descending σ within a layer, so indices arrive in order
        m, n = shapes[name]
        if j == ranks[name] and used + m + n <= budget:
            ranks[name] += 1
            used += m + n
    return ranks


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
    shapes = {n: (dense.get_submodule(n).out_features, dense.get_submodule(n).in_features) for n in targets}
    with torch.no_grad():
        spectra = {n: method.spectrum(dense.get_submodule(n).weight, stats[n], n).cpu() for n in targets}
    rows = [{"scheme": "dense", "ratio": 0.0, **{k: perplexity(dense, v) for k, v in tests.items()}}]
    importance = None
    if args.schemes is None or "gradient" in args.schemes:
        windows = single_windows(setup, args.grad_samples, first=args.grad_windows == "first")
        importance = gradient_importance(dense, targets, windows, lm_loss, method, stats)
    for ratio in args.ratios:
        r0 = {n: rank_for_ratio(*shapes[n], ratio) for n in targets}
        loss = {n: float(spectra[n][r0[n]:].double().square().sum()) for n in targets}
        energy = {n: float(spectra[n].double().square().sum()) for n in targets}
        schemes = {
            "uniform": r0,
            "v2 -log(rel)": spread_by_type(shapes, {n: -math.log(min(max(loss[n] / energy[n], 1e-12), 1 - 1e-12))
                                                    for n in targets}, ratio),
            "v2 1/log(abs)": spread_by_type(shapes, {n: 1.0 / math.log(max(loss[n], 1.0 + 1e-9)) for n in targets},
                                            ratio),
            "greedy abs": greedy(shapes, spectra, ratio, normalise=False),
            "greedy rel": greedy(shapes, spectra, ratio, normalise=True),
        }
        if importance is not None:
            schemes["gradient"] = gradient_allocation(importance, shapes, ratio=ratio).ranks
        for name, ranks in schemes.items():
            if args.schemes is not None and name not in args.schemes:
                continue
            model = copy.deepcopy(dense)
            report = compress_(model, CompressionConfig("svd_llm", ratio=ratio, targets=targets, ranks=ranks), stats)
            rows.append({"scheme": name, "ratio": ratio, "params_ratio": report.params_ratio,
                         "sum_abs_loss": sum(float(spectra[n][ranks[n]:].double().square().sum()) for n in targets),
                         "min_rank": min(ranks.values()), "max_rank": max(ranks.values()),
                         **{k: perplexity(model, v) for k, v in tests.items()}})
            print(rows[-1], file=sys.stderr)
            del model
    text = render(rows, list(tests), args, time.perf_counter() - t_start)
    print(text)
    if args.out:
        args.out.write_text(text)
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
