"""What compressing costs: calibration time against a naive float64 hook, and decomposition time split.

    python benchmarks/compression_cost.py --out docs/results/compression_cost.md

Calibration, measured side by side in one process on the same model and batches (every round runs
each variant once, alternating; each figure is the best of ``--repeats`` rounds):

- *forward only*: the calibration forwards with no hooks (the floor);
- *naive*: one forward pre-hook per targeted layer that copies its input to float64 and adds
  ``XᵀX`` with a float64 GEMM (one Gram per layer, seven per block -- the public SVD-LLM code's way);
- *ours, float64*: :func:`compression.collect_stats` with ``gemm_dtype=torch.float64``: one Gram per
  distinct input (q/k/v share, gate/up share), upper block triangle only, no activation copy,
  each forward ended after the last hooked layer (no LM head), only the Gram collected
  (``needs={"gram"}``: what ``svd_llm`` needs);
- *ours*: the same with the default float32 GEMMs into the float64 sum.

Then the Grams are compared (float32 rounding against the naive float64 ones) and ``svd_llm`` /
``svd_llm_v2`` decompose at ratio 0.2 from the collected statistics, each twice in the same run: one
matrix at a time (``decompose_threads=1``, the time split into the LAPACK calls -- Cholesky, triangular
solves, eigendecomposition, SVD -- and the rest) and ``--decompose-threads`` matrices at once in worker
threads (:mod:`compression.parallel`), whose factors are compared with the one-at-a-time ones.  A probe
on same-shaped matrices (every block's ``q_proj`` weight: SVD; every block's q/k/v input Gram: eigh)
times one matrix at a time, one batched ``torch.linalg`` call on the stack, and the worker threads.

Everything is timed on the CPU; the output says that GPU figures were not measured (and whether a CUDA device
was present).
"""

from __future__ import annotations

import copy
import sys
import time
from collections import defaultdict

import common
import torch

from compression import LowRankLinear, Recipe, collect_stats, compress_
from compression.parallel import ordered_map

LINALG = ("cholesky_ex", "solve_triangular", "eigh", "svd")


def naive_calibration(model, names, batches, forward) -> dict[str, torch.Tensor]:
    """One float64 Gram per layer, each input copied to float64 (the reference this is measured against)."""
    grams: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in grams:
                grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
            grams[name].addmm_(x.T, x)
        return fn

    handles = [modules[n].register_forward_pre_hook(hook(n)) for n in names]
    try:
        with torch.no_grad():
            for batch in batches:
                forward(model, batch)
    finally:
        for h in handles:
            h.remove()
    return grams


def timed(fn):
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def timed_decomposition(model, method: str, stats, targets, threads: int):
    """``compress_`` on a copy of ``model`` with ``threads`` decomposition threads: (seconds, seconds in
    each LAPACK call -- summed over the threads --, the factors by layer name)."""
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(torch.linalg, name) for name in LINALG}

    def wrap(name):
        def fn(*a, **k):
            start = time.perf_counter()
            try:
                return originals[name](*a, **k)
            finally:
                spent[name] += time.perf_counter() - start
        return fn

    target = copy.deepcopy(model)
    recipe = Recipe(method, ratio=0.2, targets=targets, decompose_threads=threads)
    for name in LINALG:
        setattr(torch.linalg, name, wrap(name))
    try:
        total, _ = timed(lambda: compress_(target, recipe, stats))
    finally:
        for name, fn in originals.items():
            setattr(torch.linalg, name, fn)
    factors = {n: (m.up.weight.detach(), m.down.weight.detach()) for n, m in target.named_modules()
               if isinstance(m, LowRankLinear)}
    return total, dict(spent), factors


def factor_difference(a: dict, b: dict) -> float:
    """Largest relative difference (Frobenius) of a factor between two runs; inf when the ranks differ."""
    if a.keys() != b.keys() or any(a[n][0].shape != b[n][0].shape for n in a):
        return float("inf")
    return max(float((x - y).norm() / y.norm()) for n in a for x, y in zip(a[n], b[n]))


def same_shape_probe(model, stats, targets, threads: int) -> list[tuple[str, int, float, float, float, float]]:
    """(what, count, one at a time s, one batched call s, ``threads`` threads s, largest relative difference of
    the batched / threaded results from the one-at-a-time ones) on same-shaped float64 matrices."""
    q = [n for n in targets if n.endswith("q_proj")]
    modules = dict(model.named_modules())
    cases = {
        f"SVD of each block's q_proj weight {tuple(modules[q[0]].weight.shape)}":
            ([modules[n].weight.detach().double() for n in q], lambda x: torch.linalg.svd(x, full_matrices=False)[1]),
        f"eigh of each block's q/k/v input Gram {tuple(stats[q[0]].gram.shape)}":
            ([stats[n].gram for n in q], lambda x: torch.linalg.eigh(x)[0]),
    }
    return [(what, len(mats), *three_ways(mats, fn, threads)) for what, (mats, fn) in cases.items()]


def three_ways(mats: list[torch.Tensor], fn, threads: int) -> tuple[float, float, float, float]:
    """Seconds of ``fn`` over ``mats`` one at a time, as one batched call, in ``threads`` threads, and the
    largest relative difference of the last two's results from the first's."""
    loop_s, loop = timed(lambda: [fn(x) for x in mats])
    batch_s, batched = timed(lambda: fn(torch.stack(mats)))

    def pooled():
        with ordered_map(fn, mats, threads) as results:
            return list(results)

    pool_s, pool = timed(pooled)
    diff = max(max(float((b - a).norm() / a.norm()), float((p - a).norm() / a.norm()))
               for a, b, p in zip(loop, batched, pool))
    return loop_s, batch_s, pool_s, diff


def main() -> None:
    p = common.lm_parser(__doc__, calib_samples=16, eval_tokens=None)
    p.add_argument("--repeats", type=int, default=3, help="timing rounds (best of)")
    p.add_argument("--decompose-threads", type=int, default=2,
                   help="worker threads of the threaded decomposition, timed against one matrix at a time")
    args = p.parse_args()
    if args.decompose_threads < 2:
        p.error(f"--decompose-threads must be >= 2 (it is timed against 1 thread), got {args.decompose_threads}")
    torch.set_num_threads(args.threads)
    setup = common.lm_setup(args.model, seq_len=args.seq_len, calib_samples=args.calib_samples, eval_tokens=1024)
    model, targets, forward = setup.model, setup.targets, setup.spec.calibration_forward
    batches = list(setup.datamodule.calibration_dataloader())
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    note = common.gpu_note("cpu")  # calibration and decomposition are timed on the CPU only
    print(f"{note}; {args.threads} threads, {tokens} tokens in {len(batches)} batches", file=sys.stderr)

    def forward_only():
        with torch.no_grad():
            for b in batches:
                forward(model, b)

    variants = {
        "forward only": forward_only,
        "naive": lambda: naive_calibration(model, targets, batches, forward),
        "ours, float64": lambda: collect_stats(model, targets, batches, forward=forward, needs={"gram"},
                                               gemm_dtype=torch.float64),
        "ours": lambda: collect_stats(model, targets, batches, forward=forward, needs={"gram"}),
    }
    best = {k: float("inf") for k in variants}
    results = {}
    for round_ in range(args.repeats):
        for name, fn in variants.items():
            seconds, results[name] = timed(fn)
            best[name] = min(best[name], seconds)
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in best.items()), file=sys.stderr)
    naive, ours, ours64 = results["naive"], results["ours"], results["ours, float64"]
    gram_err = max(float((ours[n].gram - g).norm() / g.norm()) for n, g in naive.items())
    gram_err64 = max(float((ours64[n].gram - g).norm() / g.norm()) for n, g in naive.items())
    naive_mib = sum(g.nbytes for g in naive.values()) / 2**20

    threads = args.decompose_threads
    decomposition = {}  # method -> (1-thread seconds, its LAPACK split, threaded seconds, factor difference)
    for method, order in (("svd_llm", (1, threads)), ("svd_llm_v2", (threads, 1))):  # ABBA against drift
        runs = {}
        for n in order:
            runs[n] = timed_decomposition(model, method, ours, targets, n)
            print(f"{method}, {n} thread(s): {runs[n][0]:.1f} s", file=sys.stderr)
        decomposition[method] = (runs[1][0], runs[1][1], runs[threads][0], factor_difference(runs[threads][2],
                                                                                               runs[1][2]))
        del runs
    probe = same_shape_probe(model, ours, targets, threads)

    command = "python benchmarks/compression_cost.py " + " ".join(sys.argv[1:])
    f = best["forward only"]
    lines = [
        f"# Compression cost: {args.model}", "", f"Command: `{command}`", "",
        f"{tokens:,} calibration tokens ({args.calib_samples} x {args.seq_len}, {len(batches)} batches), "
        f"{args.threads} CPU threads ({note}), {len(targets)} targeted layers. One process, variants "
        f"alternating, best of {args.repeats} rounds.", "",
        "## Calibration", "",
        "| variant | Grams | statistics MiB | seconds | vs naive | statistics part (seconds - forward only) |",
        "|---|---|---|---|---|---|",
        f"| forward only (no hooks) | 0 | 0 | {f:.1f} | {f / best['naive']:.2f}x | - |",
        f"| naive float64 hook per layer | {len(naive)} | {naive_mib:.0f} | {best['naive']:.1f} | 1.00x | "
        f"{best['naive'] - f:.1f} |",
    ]
    for name, stats in (("ours, float64", ours64), ("ours", ours)):
        label = "one Gram per input, float64 GEMM" if name == "ours, float64" else \
            "**one Gram per input, float32 GEMM (default)**"
        lines.append(f"| {label} | {len(stats.streams)} | {stats.nbytes() / 2**20:.0f} | {best[name]:.1f} | "
                     f"**{best[name] / best['naive']:.2f}x** | {best[name] - f:.1f} |")
    lines += [
        "", f"Largest relative difference of a Gram from the naive float64 one (Frobenius): float32 GEMMs "
        f"{gram_err:.1e}, float64 GEMMs {gram_err64:.1e}. Ours ends each forward after the last hooked "
        "layer (`stop_early`: no final norm / LM head), so it can beat *forward only*.", "",
        f"## Decomposition at ratio 0.2 (from the float32-GEMM statistics), one matrix at a time vs {threads} "
        "threads", "",
        f"*1 thread*: `decompose_threads=1` (one matrix at a time, {args.threads} intra-op threads), its time split "
        f"by LAPACK call; *{threads} threads*: `decompose_threads={threads}`, that many matrices at once in worker "
        f"threads (holding {threads} matrices' float64 working sets instead of one). Factors: largest relative "
        "difference (Frobenius) of a factor from the one-at-a-time run (ranks equal, else inf).", "",
        "| method | 1 thread s | " + " | ".join(LINALG) + f" | rest | {threads} threads s | speed-up | factors |",
        "|---|---|" + "---|" * (len(LINALG) + 1) + "---|---|---|",
    ]
    for method in ("svd_llm", "svd_llm_v2"):
        one, spent, many, diff = decomposition[method]
        rest = one - sum(spent.values())
        lines.append(f"| {method} | {one:.1f} | " + " | ".join(f"{spent.get(k, 0.0):.1f}" for k in LINALG)
                     + f" | {rest:.1f} | {many:.1f} | **{one / many:.2f}x** | {diff:.0e} |")
    lines += [
        "", "Same-shaped matrices, one at a time vs one batched `torch.linalg` call on the stack vs "
        f"{threads} worker threads (float64):", "",
        f"| matrices | count | one at a time s | batched s | {threads} threads s | largest relative difference |",
        "|---|---|---|---|---|---|",
    ]
    lines += [f"| {what} | {count} | {loop:.2f} | {batch:.2f} | {pool:.2f} | {diff:.0e} |"
              for what, count, loop, batch, pool, diff in probe]
    calib = best["ours"]
    lines += ["", "## Split", "", "| method | calibration s | decomposition s, 1 thread | "
              f"decomposition s, {threads} threads | decomposition share, 1 / {threads} threads |",
              "|---|---|---|---|---|"]
    for method in ("svd_llm", "svd_llm_v2"):
        one, _, many, _ = decomposition[method]
        lines.append(f"| {method} | {calib:.1f} | {one:.1f} | {many:.1f} | {one / (one + calib):.0%} / "
                     f"{many / (many + calib):.0%} |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
