"""What compressing costs: calibration time against a naive float64 hook, and decomposition time split.

    python benchmarks/compression_cost.py --out docs/results/compression_cost.md

Calibration, measured side by side in one process on the same model and batches (every round runs
each variant once, alternating; each figure is the best of ``--repeats`` rounds, and each ratio to the naive hook is
given twice: of the best times, and as the median over the rounds of the same round's ratio):

- *forward only*: the calibration forwards with no hooks (the floor);
- *naive*: one forward pre-hook per targeted layer that copies its input to float64 and adds
  ``XᵀX`` with a float64 GEMM (one Gram per layer, seven per block -- the public SVD-LLM code's way);
- *ours, float64*: :func:`compression.collect_stats` with ``gemm_dtype=torch.float64``: one Gram per
  distinct input (q/k/v share, gate/up share), upper block triangle only, no activation copy,
  each forward ended just before the LM head (``stop_early``), only the Gram collected
  (``needs={"gram"}``: what ``svd_llm`` needs);
- *ours*: the same with the default float32 GEMMs into the float64 sum.

Then the Grams are compared (float32 rounding against the naive float64 ones) and ``svd_llm`` /
``svd_llm_v2`` decompose at ratio 0.2 from the collected statistics, each twice in the same run: one
matrix at a time (``decompose_threads=1``, the time split into the LAPACK calls -- Cholesky, triangular
solves, eigendecomposition, SVD -- and the rest) and ``--decompose-threads`` matrices at once in worker
threads (:mod:`compression.parallel`), whose factors are compared with the one-at-a-time ones; then once more
one matrix at a time with each alternative setting of :data:`ALTERNATIVES` (``solver: svd``; ``svd_llm_v2``'s
``root: eigh``), whose products are compared with the defaults' (``--no-solver-comparison`` skips these).  A probe
on same-shaped matrices (every block's ``q_proj`` weight: SVD; every block's q/k/v input Gram: eigh)
times one matrix at a time, one batched ``torch.linalg`` call on the stack, and the worker threads.

By default everything is timed on the CPU, in float32, and the output says that GPU figures were not
measured (and whether a CUDA device was present).  ``--device cuda`` runs the model (bfloat16 by default),
the calibration and the decomposition on the GPU, adds a *bfloat16 GEMM* variant (``gemm_dtype=torch.bfloat16``,
GPU only) and synchronizes the device before every clock is read.  A model built from a config
(``--model llama-1b``, random weights: what the times depend on is the shapes) is calibrated on uniformly
random token ids, ``--calib-samples`` windows of ``--seq-len``, 4 to a batch::

    python benchmarks/compression_cost.py --model llama-1b --device cuda --calib-samples 128 --seq-len 1024 \
        --repeats 2 --methods svd_llm --decompose-threads 1 --out docs/results/gpu/compression_cost_llama1b.md

(``--decompose-threads 1``: one matrix at a time only, as the 1.1B model's run on an H200 was timed, where two
threads had gained 1.08x on SmolLM2's shapes: docs/results/gpu/README.md.)  ``--calibration-only`` times the
calibration variants and nothing else, which is how the 1.1B model's calibration was timed on 2 CPU cores (22
minutes; its SVDs would take far longer)::

    python benchmarks/compression_cost.py --model llama-1b --calibration-only --repeats 3 \
        --out docs/results/compression_cost_llama1b_cpu.md

Like the inference benchmarks, it times what a user's process gets: the OpenMP runtime's own wait policy
(spin, then sleep), not the passive waiting the other scripts set for shared machines (``benchmarks/common.py``),
which made the decomposition about 1.7x slower (LAPACK's many small parallel regions) and the calibration 3 %
slower in one probe.  The table says which policy ran; run it under the heavy-job lock, from a shell that does not
export ``OMP_WAIT_POLICY``.

Statistics are freed as soon as they are timed; the naive Grams kept for the comparison are capped at
:data:`GRAM_CHECK_BYTES` (the first layers' Grams; the output says when the cap cut the comparison short).
"""

from __future__ import annotations

import copy
import os
import statistics
import sys
import time
from collections import defaultdict

os.environ.setdefault("SVD_VGGT_OMP_WAIT", "default")  # time what a user's process gets (see benchmarks/common.py)
import common  # noqa: E402
import torch  # noqa: E402

from compression import LowRankLinear, Recipe, collect_stats, compress_  # noqa: E402
from compression.parallel import ordered_map  # noqa: E402
from lightning_modules.specs import CausalLMSpec  # noqa: E402

LINALG = ("cholesky_ex", "solve_triangular", "eigh", "svd")
METHODS = ("svd_llm", "svd_llm_v2")


def naive_calibration(model, names, batches, forward) -> dict[str, torch.Tensor]:
    """One float64 Gram per layer, each input copied to float64 (the reference this is measured against)."""
    grams: dict[str, torch.Tensor] = {}
    modules = dict(model.named_modules())

    def hook(name):
        def fn(module, args):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            if name not in grams:
                grams[name] = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64, device=x.device)
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


GRAM_CHECK_BYTES = 2 * 2**30
"""The naive Grams kept for the comparison with ours, in layer order (all of SmolLM2-135M's 996 MiB; a 1.1B
model's 10 GB next to its 4.4 GB of weights and our 7.8 GB would not fit a 24 GiB machine)."""


def first_grams(grams: dict[str, torch.Tensor], budget: int) -> dict[str, torch.Tensor]:
    """The leading entries of ``grams`` whose bytes fit in ``budget`` (at least one)."""
    kept, total = {}, 0
    for name, g in grams.items():
        if kept and total + g.nbytes > budget:
            break
        kept[name], total = g, total + g.nbytes
    return kept


def sync() -> None:
    """Wait for the GPU's queued work before a clock is read (nothing to wait for in a CPU-only process)."""
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()


def sec(seconds: float) -> str:
    """Seconds for a table: three significant digits down to a millisecond (GPU times are short)."""
    return f"{seconds:.1f}" if seconds >= 10 else f"{seconds:.2f}" if seconds >= 1 else f"{seconds:.3f}"


def round_ratio(rounds: dict[str, list[float]], name: str) -> float:
    """Median over the rounds of ``name``'s seconds over the naive hook's in the same round: a noise spike in one
    variant's run moves the best-of figures' ratio but not this."""
    return statistics.median(a / b for a, b in zip(rounds[name], rounds["naive"]))


def timed(fn):
    sync()
    start = time.perf_counter()
    out = fn()
    sync()
    return time.perf_counter() - start, out


def timed_decomposition(model, method: str, stats, targets, threads: int, method_args: dict | None = None):
    """``compress_`` on a copy of ``model`` with ``threads`` decomposition threads (and ``method_args``, e.g. a
    non-default solver): (seconds, seconds in each LAPACK call -- summed over the threads --, the factors by layer
    name)."""
    spent: dict[str, float] = defaultdict(float)
    originals = {name: getattr(torch.linalg, name) for name in LINALG}

    def wrap(name):
        def fn(*a, **k):
            sync()  # the work queued before the call is not the call's
            start = time.perf_counter()
            try:
                return originals[name](*a, **k)
            finally:
                sync()  # a GPU call returns before it is done: its time is the wait too
                spent[name] += time.perf_counter() - start
        return fn

    target = copy.deepcopy(model)
    recipe = Recipe(method, ratio=0.2, targets=targets, decompose_threads=threads, method_args=method_args or {})
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


def product_difference(a: dict, b: dict) -> float:
    """Largest relative difference (Frobenius) of a layer's product ``up @ down`` between two runs (factors of two
    solvers differ by signs and rotations within equal singular values; their products do not)."""
    worst = 0.0
    for n, (up, down) in b.items():
        ref = up @ down
        worst = max(worst, float((a[n][0] @ a[n][1] - ref).norm() / ref.norm()))
    return worst


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


def decomposition_tables(args, decomposition: dict, probe: list, calib: float) -> list[str]:
    """The decomposition sections: each method's time one matrix at a time split by LAPACK call (and threaded),
    the same-shape probe, and the calibration / decomposition split (``calib``: the default calibration's s)."""
    threads = args.decompose_threads
    lines = [
        "",
        "## Decomposition at ratio 0.2 (from the float32-GEMM statistics), one matrix at a time"
        + (f" vs {threads} threads" if threads > 1 else ""), "",
        f"*1 thread*: `decompose_threads=1` (one matrix at a time, {args.threads} intra-op threads), its time split "
        "by linear-algebra call (LAPACK on a CPU, cuSOLVER on a GPU)" + (
            f"; *{threads} threads*: `decompose_threads={threads}`, that many matrices at once in worker threads "
            f"(holding {threads} matrices' float64 working sets instead of one). Factors: largest relative "
            "difference (Frobenius) of a factor from the one-at-a-time run (ranks equal, else inf)." if threads > 1
            else " (`--decompose-threads 1`: no threaded run)."), "",
        "| method | 1 thread s | " + " | ".join(LINALG) + " | rest |"
        + (f" {threads} threads s | speed-up | factors |" if threads > 1 else ""),
        "|---|---|" + "---|" * (len(LINALG) + 1) + ("---|---|---|" if threads > 1 else ""),
    ]
    for method in args.methods:
        one, spent, many, diff = decomposition[method]
        rest = one - sum(spent.values())
        lines.append(f"| {method} | {sec(one)} | " + " | ".join(f"{sec(spent.get(k, 0.0))}" for k in LINALG)
                     + f" | {sec(rest)} |"
                     + (f" {sec(many)} | **{one / many:.2f}x** | {diff:.0e} |" if threads > 1 else ""))
    if probe:
        lines += [
            "", "Same-shaped matrices, one at a time vs one batched `torch.linalg` call on the stack vs "
            f"{threads} worker threads (float64):", "",
            f"| matrices | count | one at a time s | batched s | {threads} threads s | largest relative difference |",
            "|---|---|---|---|---|---|",
        ]
        lines += [f"| {what} | {count} | {sec(loop)} | {sec(batch)} | {sec(pool)} | {diff:.0e} |"
                  for what, count, loop, batch, pool, diff in probe]
    lines += ["", "## Split", "", "| method | calibration s | decomposition s, 1 thread | "
              + (f"decomposition s, {threads} threads | decomposition share, 1 / {threads} threads |" if threads > 1
                 else "decomposition share |"),
              "|---|---|---|---|" + ("---|" if threads > 1 else "")]
    for method in args.methods:
        one, _, many, _ = decomposition[method]
        lines.append(f"| {method} | {sec(calib)} | {sec(one)} | " + (
            f"{sec(many)} | {one / (one + calib):.0%} / {many / (many + calib):.0%} |" if threads > 1
            else f"{one / (one + calib):.0%} |"))
    return lines


ALTERNATIVES = {
    "svd_llm": [("solver", "svd", "svd")],
    "svd_llm_v2": [("solver", "svd", "svd"), ("root", "eigh", "eigh")],
}
"""Each method's settings timed against its defaults: (argument, value, the LAPACK call that value spends on)."""


def alternatives_table(decomposition: dict, alternatives: dict) -> list[str]:
    """Each method's defaults against the alternatives in :data:`ALTERNATIVES`, one matrix at a time."""
    lines = ["", "## Defaults against their alternatives, one matrix at a time", "",
             "`solver: gram_eigh` (default) factors each transformed weight through the eigenvectors of its smaller "
             "Gram side; `solver: svd` calls the SVD (`compression.methods.thin_svd`). `svd_llm_v2`'s `root: auto` "
             "(default) whitens with the Gram's Cholesky factor when no eigenvalue is below `eig_rtol · max`; "
             "`root: eigh` always with its eigendecomposition (`compression.whitening.margin_cholesky`). Product: "
             "largest relative difference (Frobenius) of a layer's `up @ down` between the two.", "",
             "| method | alternative | default s | alternative s | speed-up | alternative's s in that call | product |",
             "|---|---|---|---|---|---|---|"]
    for (method, arg, value, call), (alt_s, alt_spent, diff) in alternatives.items():
        one = decomposition[method][0]
        lines.append(f"| {method} | `{arg}: {value}` | {sec(one)} | {sec(alt_s)} | **{alt_s / one:.2f}x** | "
                     f"{sec(alt_spent.get(call, 0.0))} (`{call}`) | {diff:.0e} |")
    return lines


def main() -> None:
    p = common.lm_parser(__doc__, calib_samples=16, eval_tokens=None, model_help=common.MODEL_HELP)
    p.add_argument("--device", default="cpu", help="cpu, or cuda: model, calibration and decomposition on the GPU")
    p.add_argument("--dtype", default=None, help="the model's dtype: float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (best of)")
    p.add_argument("--decompose-threads", type=int, default=2,
                   help="worker threads of the threaded decomposition, timed against one matrix at a time "
                        "(1: one matrix at a time only, no threaded run and no same-shape probe)")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS,
                   help="methods whose decomposition is timed")
    p.add_argument("--calibration-only", action="store_true",
                   help="time the calibration variants only: no decomposition, no same-shape probe")
    p.add_argument("--no-solver-comparison", action="store_true",
                   help="skip the one-at-a-time decompositions with each method's alternative settings (solver: "
                        "svd; svd_llm_v2's root: eigh)")
    args = p.parse_args()
    if args.calibration_only:
        args.methods = []
    if args.decompose_threads < 1:
        p.error(f"--decompose-threads must be >= 1, got {args.decompose_threads}")
    common.require_device(p, args.device)
    cuda = args.device.startswith("cuda")
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if cuda else "float32"))
    if args.model in common.CONFIG_MODELS:  # random weights and token ids: the times depend on the shapes only
        model = common.load_lm(args.model, args.device, dtype)
        targets = CausalLMSpec(model=model).default_targets(model)
        batches = common.random_windows(model.config.vocab_size, args.calib_samples, args.seq_len,
                                        device=args.device)
        source = "uniformly random token ids"
    else:
        setup = common.lm_setup(args.model, seq_len=args.seq_len, calib_samples=args.calib_samples,
                                eval_tokens=1024)
        model, targets = setup.model.to(args.device, dtype), setup.targets
        batches = [{k: v.to(args.device) for k, v in b.items()} for b in setup.datamodule.calibration_dataloader()]
        source = "the default calibration mix"
    forward = CausalLMSpec(model=model).calibration_forward
    tokens = sum(int(b["input_ids"].numel()) for b in batches)
    note = common.gpu_note(args.device)
    where = f"{note}, {dtype}" if cuda else f"{args.threads} CPU threads ({note}; {common.omp_note()}), {dtype}"
    print(f"{where}; {tokens} tokens in {len(batches)} batches", file=sys.stderr)

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
    if cuda:
        variants["ours, bfloat16"] = lambda: collect_stats(model, targets, batches, forward=forward, needs={"gram"},
                                                           gemm_dtype=torch.bfloat16)
    rounds: dict[str, list[float]] = {k: [] for k in variants}
    best = {k: float("inf") for k in variants}
    # statistics are dropped as soon as they are measured (a 1.1B model's naive Grams are 10 GB, ours 7.8 GB):
    # the first round compares each variant's Grams with the naive ones, only the default's are kept
    sizes: dict[str, tuple[int, int]] = {}  # variant -> (Grams, bytes)
    gram_err: dict[str, float] = {}
    naive = None
    for round_ in range(args.repeats):
        ours = None  # the previous round's statistics are freed before this round's variants run
        for name, fn in variants.items():
            seconds, result = timed(fn)
            rounds[name].append(seconds)
            best[name] = min(best[name], seconds)
            if name == "naive":
                sizes[name] = (len(result), sum(g.nbytes for g in result.values()))
                if round_ == 0:  # the Grams the other variants are compared with (the first round only)
                    naive = first_grams(result, GRAM_CHECK_BYTES)
                    checked = len(naive)
            elif name.startswith("ours"):
                sizes[name] = (len(result.streams), result.nbytes())
                if naive is not None:
                    gram_err[name] = max(float((result[n].gram - g).norm() / g.norm()) for n, g in naive.items())
                if name == "ours":
                    ours = result
            del result
        naive = None
        print(f"round {round_ + 1}: " + ", ".join(f"{k} {v:.1f} s" for k, v in best.items()), file=sys.stderr)
    naive_mib = sizes["naive"][1] / 2**20

    threads = args.decompose_threads
    # method -> (1-thread seconds, its LAPACK split, threaded seconds, factor difference; None at 1 thread)
    decomposition = {}
    # (method, argument, value, call) -> (1-thread seconds with that setting, its LAPACK split, product difference
    # from the defaults')
    alternatives = {}
    for i, method in enumerate(args.methods):  # ABBA against drift
        order = (1,) if threads == 1 else (1, threads) if i % 2 == 0 else (threads, 1)
        runs = {}
        for n in order:
            runs[n] = timed_decomposition(model, method, ours, targets, n)
            print(f"{method}, {n} thread(s): {runs[n][0]:.1f} s", file=sys.stderr)
        many = (runs[threads][0], factor_difference(runs[threads][2], runs[1][2])) if threads > 1 else (None, None)
        decomposition[method] = (runs[1][0], runs[1][1], *many)
        for arg, value, call in [] if args.no_solver_comparison else ALTERNATIVES[method]:
            alt_s, alt_spent, alt_factors = timed_decomposition(model, method, ours, targets, 1, {arg: value})
            print(f"{method}, 1 thread, {arg} {value}: {alt_s:.1f} s", file=sys.stderr)
            alternatives[method, arg, value, call] = (alt_s, alt_spent, product_difference(runs[1][2], alt_factors))
        del runs
    probe = same_shape_probe(model, ours, targets, threads) if threads > 1 and args.methods else []

    command = "python benchmarks/compression_cost.py " + " ".join(sys.argv[1:])
    f = best["forward only"]
    lines = [
        f"# Compression cost: {args.model}", "", f"Command: `{command}`", "",
        f"{tokens:,} calibration tokens ({args.calib_samples} x {args.seq_len} of {source}, {len(batches)} "
        f"batches), {where}, {len(targets)} targeted layers. One process, variants alternating, best of "
        f"{args.repeats} rounds{'; the GPU synchronized before every clock read' if cuda else ''}.", "",
        "## Calibration", "",
        "| variant | Grams | statistics MiB | seconds | vs naive | vs naive, median of the rounds' ratios "
        "| statistics part (seconds - forward only) |",
        "|---|---|---|---|---|---|---|",
        f"| forward only (no hooks) | 0 | 0 | {sec(f)} | {f / best['naive']:.2f}x | "
        f"{round_ratio(rounds, 'forward only'):.2f}x | - |",
        f"| naive float64 hook per layer | {sizes['naive'][0]} | {naive_mib:.0f} | {sec(best['naive'])} | 1.00x | "
        "1.00x | "
        f"{sec(best['naive'] - f)} |",
    ]
    labels = {"ours, float64": "one Gram per input, float64 GEMM",
              "ours": "**one Gram per input, float32 GEMM (default)**",
              "ours, bfloat16": "one Gram per input, bfloat16 GEMM (`gemm_dtype=torch.bfloat16`)"}
    for name in (n for n in variants if n.startswith("ours")):
        (grams, nbytes), label = sizes[name], labels[name]
        lines.append(f"| {label} | {grams} | {nbytes / 2**20:.0f} | {sec(best[name])} | "
                     f"**{best[name] / best['naive']:.2f}x** | {round_ratio(rounds, name):.2f}x | "
                     f"{sec(best[name] - f)} |")
    lines += [
        "", "Largest relative difference of a Gram from the naive float64 one (Frobenius): " + ", ".join(
            f"{name.removeprefix('ours, ') if ',' in name else 'float32'} GEMMs {err:.1e}"
            for name, err in gram_err.items())
        + (f" (the first {checked} of {sizes['naive'][0]} layers' Grams: the naive ones kept for the comparison "
           f"are capped at {GRAM_CHECK_BYTES / 2**30:.0f} GiB)" if checked < sizes["naive"][0] else "")
        + ". Ours ends each forward just before the LM head "
        "(`stop_early`), so it can beat *forward only*.",
    ]
    if args.methods:
        lines += decomposition_tables(args, decomposition, probe, best["ours"])
    if alternatives:
        lines += alternatives_table(decomposition, alternatives)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:  # the notes written under an earlier run's tables stay
        common.write_keeping_notes(args.out, text)


if __name__ == "__main__":
    main()
