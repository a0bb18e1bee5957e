"""Dense vs compressed causal-LM inference speed, side by side with the speed-up bounds.

    python benchmarks/llm_efficiency.py --model smollm2-135m --ratios 0.2 0.4 0.6 \
        --out docs/results/llm_efficiency.md

One process holds the dense model and, per ratio, the factored model as ``compress_`` leaves it
("plain") and laid out for inference by :func:`compression.fused.optimize_for_inference_`
("optimized": shared down GEMMs for q/k/v and gate/up, measured factor layouts, down GEMMs zero-padded
to a measured faster width, measured merge-back;
one copy laid out for 1-token decode steps, one for the prompt length; the GEMM timings those
decisions read are measured in this run, not read from the on-disk cache, so a cache filled by an
earlier run on a loaded machine cannot steer them).  Every timing round runs
every model once, alternating, and each figure is the best of ``--repeats`` rounds, so all models
see the same machine load.  Ranks come from the uniform allocation, the same for every
decomposition method, so the factors are plain SVD (no calibration needed; shapes are what matter).
The model is decomposed once, at the lowest ratio; every other ratio's model is that one with each
factor pair cut to the rank the higher ratio gives (:func:`truncated`): plain SVD factors at a smaller
rank are the leading columns and rows of those at a larger one, so the result is what ``compress_`` at
that ratio gives (``tests/test_llm_efficiency_bench.py`` checks it), for one set of SVDs instead of
one per ratio (a 1.1B model's float64 SVDs take minutes, on a GPU too).

- prefill: one forward of ``--prompt`` tokens (no cache); bound = dense FLOPs / compressed FLOPs
  (whole model, :func:`metrics.flops.count_flops`: every matmul plus attention, counted as torch
  counts its attention kernels, ``4 N M d`` per head with no discount for the causal mask);
- decode: batch-1 greedy decoding with a KV cache (``DynamicCache``), ``--new`` tokens after a
  16-token prompt (whose prefill is not timed); bound = dense weight bytes / compressed weight bytes
  (whole model: a decode step reads every weight once).

With ``--compile`` the dense model and every optimized model are also timed wrapped in
``torch.compile(dynamic=True)`` (:func:`compression.fused.optimize_for_inference_` with ``compile=True``;
the dense copy by :func:`compression.fused.compile_forward_`, the same options; one compiled dense
copy serves prefill and decode), and the compiled speed-ups are compiled compressed
over *compiled dense*, against the same bounds; ``--cpp-wrapper`` compiles both with inductor's C++
wrapper, and ``--gemv`` compiles the dense model and the decode models with every one-token product as
a generated multiply-reduce kernel instead of a BLAS call (``gemv=True``, :mod:`compression.gemv`; the
optimized decode models then keep row-major factors, unpadded, none merged back).  The untimed decode
prompt runs eagerly (``torch.compiler.set_stance("force_eager")``), so a compiled decode model compiles one graph, the
1-token step with a growing cache (the cache length is a dynamic dimension); the graphs compiled
during warm-up and during the timed rounds are counted and printed (a recompile inside the timed
rounds would be timed, so the table says how many there were).

Without a CUDA device the script says so (GPU figures not measured) and measures on the CPU only.
It runs with the OpenMP runtime's default wait policy, not the passive one the other benchmarks set
(``benchmarks/common.py``), and its table says which policy it ran under (an ``OMP_WAIT_POLICY``
exported by the caller is kept): run it under the heavy-job lock, with no other job on the cores.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("SVD_VGGT_OMP_WAIT", "default")  # time what a user's process gets (see benchmarks/common.py)
import common  # noqa: E402 -- before torch: the OpenMP wait policy, sys.path
import torch  # noqa: E402

from compression import LowRankLinear, Recipe, compress_  # noqa: E402
from compression.fused import compile_forward_, optimize_for_inference_  # noqa: E402
from compression.gemm_timing import GemmTimer  # noqa: E402
from compression.lowrank import rank_for_ratio  # noqa: E402
from compression.plan import set_submodule  # noqa: E402
from lightning_modules.specs import CausalLMSpec  # noqa: E402
from metrics.flops import count_flops  # noqa: E402
from models.causal_lm import cache_keyword  # noqa: E402


def truncated(model: torch.nn.Module, ratio: float) -> torch.nn.Module:
    """A copy of a plain-SVD factored ``model`` with every :class:`LowRankLinear` cut to the rank that ``ratio``
    gives its shape under the uniform allocation (its leading ``up`` columns and ``down`` rows): what
    ``compress_(dense, Recipe("svd", ratio=ratio))`` gives, when ``model`` was compressed at a lower ratio."""
    out = copy.deepcopy(model)
    for name, layer in [(n, m) for n, m in out.named_modules() if isinstance(m, LowRankLinear)]:
        rank = rank_for_ratio(layer.out_features, layer.in_features, ratio)
        if rank > layer.rank:
            raise ValueError(f"{name}: rank {rank} at ratio {ratio} exceeds the factors' rank {layer.rank}; "
                             "truncate from a model compressed at a lower ratio")
        cut = LowRankLinear(layer.in_features, layer.out_features, rank, bias=layer.up.bias is not None,
                            device=layer.up.weight.device, dtype=layer.up.weight.dtype)
        cut.set_factors(layer.up.weight[:, :rank], layer.down.weight[:rank])
        if layer.up.bias is not None:
            with torch.no_grad():
                cut.up.bias.copy_(layer.up.bias)
        set_submodule(out, name, cut)
    return out


def weight_bytes(model: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m",
                   help=common.MODEL_HELP)
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=256, help="prefill tokens")
    p.add_argument("--new", type=int, default=32, help="decoded tokens")
    p.add_argument("--repeats", type=int, default=5, help="timing rounds (best of)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile'd optimized models")
    p.add_argument("--cpp-wrapper", action="store_true",
                   help="with --compile: inductor's C++ wrapper, for the dense and the optimized models alike")
    p.add_argument("--gemv", action="store_true",
                   help="with --compile: one-token products as generated kernels, not BLAS (dense and decode models)")
    p.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    args = p.parse_args()
    if args.cpp_wrapper and not args.compile:
        p.error("--cpp-wrapper applies to the compiled models: add --compile")
    if args.gemv and not args.compile:
        p.error("--gemv applies to the compiled models: add --compile")
    common.require_device(p, args.device)
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    cuda = args.device.startswith("cuda")
    note = common.gpu_note(args.device)
    print(f"{note}; measuring on {args.device} ({dtype}, {args.threads} threads); {common.omp_note()}", file=sys.stderr)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    dense = common.load_lm(args.model, args.device, dtype)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, dense.config.vocab_size, (1, args.prompt), generator=g).to(args.device)
    short = prompt[:, :16]
    models: dict[str, torch.nn.Module] = {"dense": dense}
    info: dict[str, dict] = {"dense": {"ratio": 0.0, "bytes": weight_bytes(dense)}}
    if args.compile:  # the baseline of the compiled speed-ups is compiled too
        models["dense compiled"] = compile_forward_(copy.deepcopy(dense), cpp_wrapper=args.cpp_wrapper,
                                                   gemv=args.gemv)  # as below
    timer = GemmTimer(cache_path=False)  # every shape measured once in this run, shared by all ratios
    lowest = None  # the model compressed at the lowest ratio: the others are cut from it
    for ratio in sorted(args.ratios):
        if lowest is None:
            lowest = copy.deepcopy(dense)
            compress_(lowest, Recipe("svd", ratio=ratio, targets=CausalLMSpec(model=lowest).default_targets(lowest)))
        plain = truncated(lowest, ratio)
        models[f"{ratio} plain"] = plain
        info[f"{ratio} plain"] = {"ratio": ratio, "bytes": weight_bytes(plain)}
        for kind, tokens, example in (("decode", 1, short), ("prefill", args.prompt, prompt)):
            fast = copy.deepcopy(plain)
            report = optimize_for_inference_(fast, batch_tokens=tokens, example={"input_ids": example}, timer=timer)
            key = f"{ratio} {kind}"
            models[key] = fast
            info[key] = {"ratio": ratio, "bytes": weight_bytes(fast), "merged": len(report.merged),
                         "groups": len(report.groups), "gemm_speedup": report.gemm_speedup()}
            print(f"{key}: {len(report.merged)} merged, {len(report.groups)} shared-down groups, "
                  f"{len(report.padding)} padded down GEMMs {sorted(set(report.padding.values()))}, "
                  f"GEMM-time speed-up {report.gemm_speedup():.2f}x", file=sys.stderr)
            if args.compile:
                comp = copy.deepcopy(plain)
                optimize_for_inference_(comp, batch_tokens=tokens, example={"input_ids": example}, compile=True,
                                        timer=timer, cpp_wrapper=args.cpp_wrapper,
                                        gemv=args.gemv and kind == "decode")
                models[f"{key} compiled"] = comp
                info[f"{key} compiled"] = dict(info[key])
    del lowest  # every ratio's model is cut: the source need not stay in memory through the timing

    # metrics.flops counts CPU attention too (torch's own counter leaves its flash kernel at 0 FLOPs,
    # which made the prefill bound a weights-only ratio, higher than the whole model's)
    flops = {name: count_flops(models[name], input_ids=prompt, use_cache=False, prefixes=[])["total"] * 1e9
             / args.prompt for name in ("dense", *(f"{r} plain" for r in args.ratios))}

    @torch.no_grad()
    def prefill(model):
        model(input_ids=prompt, use_cache=False)
        sync()

    @torch.no_grad()
    def decode(model):
        from transformers import DynamicCache

        cache = {cache_keyword(model): DynamicCache()}
        with torch.compiler.set_stance("force_eager"):  # the untimed prompt: no graph compiled for it
            out = model(input_ids=short, **cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)
        sync()
        start = time.perf_counter()
        for _ in range(args.new):
            out = model(input_ids=token, **cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        sync()
        return time.perf_counter() - start

    def timed(fn, model):
        start = time.perf_counter()
        fn(model)
        return time.perf_counter() - start

    prefill_models = [n for n in models if "decode" not in n]
    decode_models = [n for n in models if "prefill" not in n]
    best = {("prefill", n): float("inf") for n in prefill_models} | {("decode", n): float("inf") for n in decode_models}
    graphs = compiled_graphs()
    warmup: dict[tuple[str, str], tuple[float, int]] = {}  # (seconds, graphs compiled) of each warm-up call
    for kind, fn, names in (("prefill", prefill, prefill_models), ("decode", decode, decode_models)):
        for n in names:
            before = compiled_graphs()
            warmup[kind, n] = (timed(fn, models[n]), compiled_graphs() - before)  # warm-up (and compilation)
    graphs = {"warm-up": compiled_graphs() - graphs, "timed": compiled_graphs()}
    if args.compile:
        print("warm-up (compilation included): " + ", ".join(
            f"{kind} {n} {s:.1f} s {g} graphs" for (kind, n), (s, g) in warmup.items() if "compiled" in n),
            file=sys.stderr)
    for round_ in range(args.repeats):
        for n in prefill_models:
            best["prefill", n] = min(best["prefill", n], timed(prefill, models[n]))
        for n in decode_models:
            best["decode", n] = min(best["decode", n], decode(models[n]))
        print(f"round {round_ + 1}/{args.repeats} done", file=sys.stderr)
    graphs["timed"] = compiled_graphs() - graphs["timed"]
    peaks: dict[tuple[str, str], int] = {}
    if cuda:  # after the timed rounds, untimed: each model's peak as if it ran alone
        for kind, fn, names in (("prefill", prefill, prefill_models), ("decode", decode, decode_models)):
            for n in names:
                sync()
                torch.cuda.reset_peak_memory_stats()
                base = torch.cuda.memory_allocated()
                fn(models[n])
                sync()
                peaks[kind, n] = weight_bytes(models[n]) + torch.cuda.max_memory_allocated() - base
    print(f"graphs compiled: {graphs['warm-up']} in the warm-up, {graphs['timed']} in the timed rounds",
          file=sys.stderr)

    rows = []
    for ratio in args.ratios:
        plain = f"{ratio} plain"
        row = {"ratio": ratio, "params": sum(p.numel() for p in models[plain].parameters()),
               "weight_mib": info[plain]["bytes"] / 2**20,
               "gflop_token": flops[plain] / 1e9,
               "prefill_bound": flops["dense"] / flops[plain],
               "decode_bound": info["dense"]["bytes"] / info[plain]["bytes"]}
        for kind in ("prefill", "decode"):
            per = args.prompt if kind == "prefill" else args.new
            row[f"{kind}_dense"] = per / best[kind, "dense"]
            row[f"{kind}_plain"] = per / best[kind, plain]
            row[f"{kind}_opt"] = per / best[kind, f"{ratio} {kind}"]
            row[f"{kind}_merged"] = info[f"{ratio} {kind}"]["merged"]
            if args.compile:
                row[f"{kind}_dense_compiled"] = per / best[kind, "dense compiled"]
                row[f"{kind}_compiled"] = per / best[kind, f"{ratio} {kind} compiled"]
        rows.append(row)
    print(json.dumps(rows), file=sys.stderr)
    text = table(rows, args, dense, note, dtype, graphs) + memory_table(peaks)
    print(text)
    if args.out:  # notes under "## Reading" in an existing file are kept
        common.write_keeping_notes(args.out, text)


def memory_table(peaks: dict[tuple[str, str], int]) -> str:
    """Peak memory per model (CUDA runs): its parameters' bytes plus the most one prefill / decode call
    allocated on top of what was allocated before it (activations, the KV cache, workspaces)."""
    if not peaks:
        return ""

    def label(name: str) -> str:  # "0.4 prefill compiled" and "0.4 decode compiled" are one row
        return name.replace(" prefill", " optimized").replace(" decode", " optimized")

    by_row = {(kind, label(name)): value for (kind, name), value in peaks.items()}
    names = list(dict.fromkeys(label(name) for _, name in peaks))

    def cell(kind: str, name: str) -> str:
        return f"{by_row[kind, name] / 2**20:,.0f}" if (kind, name) in by_row else "-"

    lines = ["", "## Peak GPU memory", "",
             "Per model, as if it ran alone: its parameters' bytes plus the most one call allocated on top "
             "(`torch.cuda.max_memory_allocated`; the decode call holds its KV cache). Measured once per model "
             "after the timed rounds.", "",
             "| model | prefill peak MiB | decode peak MiB |", "|---|---|---|"]
    lines += [f"| {name} | {cell('prefill', name)} | {cell('decode', name)} |" for name in names]
    return "\n".join(lines) + "\n"


def compiled_graphs() -> int:
    """Graphs torch.compile has compiled in this process so far."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def table(rows: list[dict], args, dense, note: str, dtype, graphs: dict[str, int]) -> str:
    command = "python benchmarks/llm_efficiency.py " + " ".join(sys.argv[1:])
    d = rows[0]
    lines = [
        "# Causal-LM efficiency: dense vs low-rank, measured against the bounds", "",
        f"Command: `{command}`", "",
        f"Model `{args.model}` ({sum(p.numel() for p in dense.parameters()):,} parameters), {note}; measured on "
        f"`{args.device}`, {dtype}, {args.threads} threads; {common.omp_note()}. One process, models alternating, "
        f"best of {args.repeats} rounds. Dense: prefill {d['prefill_dense']:.0f} tok/s ({args.prompt}-token prompt), "
        f"decode {d['decode_dense']:.1f} tok/s (batch 1, greedy, KV cache, {args.new} tokens). "
        "*plain*: the factored model as `compress_` leaves it; *optimized*: after "
        "`optimize_for_inference_(model, batch_tokens=1 or the prompt length)` (shared down GEMMs, measured "
        "layouts, padding and merge-back; GEMM timings measured in this run); target = 0.8 x bound.", "",
        "| ratio | params | weights MiB | GFLOP/token | prefill bound | plain | optimized | merged | "
        "decode bound | plain | optimized | merged |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        pre = [r["prefill_plain"] / r["prefill_dense"], r["prefill_opt"] / r["prefill_dense"]]
        dec = [r["decode_plain"] / r["decode_dense"], r["decode_opt"] / r["decode_dense"]]
        lines.append(
            f"| {r['ratio']:.1f} | {r['params']:,} | {r['weight_mib']:.1f} | {r['gflop_token']:.3f} | "
            f"{r['prefill_bound']:.2f}x | {pre[0]:.2f}x | **{pre[1]:.2f}x** | {r['prefill_merged']} | "
            f"{r['decode_bound']:.2f}x | {dec[0]:.2f}x | **{dec[1]:.2f}x** | {r['decode_merged']} |")
    lines += ["", "Optimized speed-up / bound (target >= 0.8): " + "; ".join(
        f"{r['ratio']}: prefill {r['prefill_opt'] / r['prefill_dense'] / r['prefill_bound']:.2f}, "
        f"decode {r['decode_opt'] / r['decode_dense'] / r['decode_bound']:.2f}" for r in rows) + " -- "
        + ("all targets met." if all(r[f"{k}_opt"] / r[f"{k}_dense"] >= 0.8 * r[f"{k}_bound"]
                                     for r in rows for k in ("prefill", "decode")) else "**a target is missed.**")]
    if args.compile:
        lines += compiled_table(rows, args, graphs)
    return "\n".join(lines) + "\n"


def compiled_table(rows: list[dict], args, graphs: dict[str, int]) -> list[str]:
    """The ``--compile`` rows: compiled optimized models over the *compiled* dense model, against the same bounds."""
    d = rows[0]
    lines = [
        "", "## torch.compile: compiled compressed over compiled dense", "",
        f"`torch.compile(dynamic=True)` with the shared-product merge (`compile_forward_`"
        f"{', inductor C++ wrapper' if args.cpp_wrapper else ''}"
        f"{', one-token products as generated kernels (`gemv=True`: dense and decode models)' if args.gemv else ''}"
        f") on the dense model and on each optimized model "
        f"(`optimize_for_inference_(..., compile=True)`). Compiled dense: prefill "
        f"{d['prefill_dense_compiled']:.0f} tok/s, decode {d['decode_dense_compiled']:.1f} tok/s "
        f"({d['prefill_dense_compiled'] / d['prefill_dense']:.2f}x / "
        f"{d['decode_dense_compiled'] / d['decode_dense']:.2f}x eager dense). Graphs compiled: {graphs['warm-up']} "
        f"in the warm-up, {graphs['timed']} in the timed rounds.", "",
        "| ratio | prefill bound | compiled | / bound | tok/s | decode bound | compiled | / bound | tok/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    met = True
    for r in rows:
        cells = []
        for kind in ("prefill", "decode"):
            speedup = r[f"{kind}_compiled"] / r[f"{kind}_dense_compiled"]
            met &= speedup >= 0.8 * r[f"{kind}_bound"]
            cells.append(f"{r[f'{kind}_bound']:.2f}x | **{speedup:.2f}x** | {speedup / r[f'{kind}_bound']:.2f} | "
                         f"{r[f'{kind}_compiled']:.1f}")
        lines.append(f"| {r['ratio']:.1f} | " + " | ".join(cells) + " |")
    lines += ["", "Compiled target (>= 0.8 of the bound): " + ("all met." if met else "**a target is missed.**")]
    return lines


if __name__ == "__main__":
    main()
