"""Dense vs compressed efficiency of a causal LM: memory, prefill/decode throughput, FLOPs.

    python benchmarks/llm_efficiency.py --model smollm2-135m --ratios 0.2 0.4 0.6 \
        --out docs/results/llm_efficiency.md

Every configuration runs in a fresh subprocess so that peak memory is that configuration's
own (CPU: peak RSS of the process; CUDA: ``max_memory_allocated``).  Ranks come from the
uniform allocation, which is the same for every decomposition method, so speed is measured
on plain-SVD factors (no calibration needed; the shapes are what matter).

Reported per configuration: parameters, weight memory, peak memory, prefill tokens/s
(one sequence of ``--prompt`` tokens), decode tokens/s (greedy, KV cache, ``--new`` tokens),
forward FLOPs per token counted with ``torch.utils.flop_counter``, and the measured prefill
speed-up beside the FLOP-ratio bound.
"""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import ctypes
import gc
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def load(model_name: str):
    if model_name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                          num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
        return LlamaForCausalLM(cfg).eval()
    from models.causal_lm import load_causal_lm

    return load_causal_lm(model_name)[0].eval()


@torch.no_grad()
def private_copy_(model: torch.nn.Module) -> None:
    """Copy every parameter and buffer into the process's own memory.

    ``from_pretrained`` leaves the weights as views of the memory-mapped safetensors file; those
    file pages count in the RSS and stay mapped while any tensor still views the file (the
    embeddings do), so the dense weights a compression replaced would still be counted in the
    compressed model's peak (measured: +513 MiB at every ratio). Tied weights stay tied (one
    ``Parameter`` object is updated in place).
    """
    for p in model.parameters():
        p.data = p.data.clone()
    for module in model.modules():
        for name, b in module.named_buffers(recurse=False):
            if b is not None:
                setattr(module, name, b.clone())


def reset_peak_rss() -> bool:
    """Return freed heap to the OS and reset the kernel's peak-RSS counter (Linux >= 4.0)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def proc_status_mib(field: str) -> float:
    """A memory field of ``/proc/self/status`` in MiB: ``VmRSS`` (now) or ``VmHWM`` (peak since the reset)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


@torch.no_grad()
def worker(args: argparse.Namespace) -> dict:
    from torch.utils.flop_counter import FlopCounterMode

    from compression import Recipe, compress_
    from lightning_modules.specs import CausalLMSpec

    torch.set_num_threads(args.threads)
    rss_start = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    rss_runtime = proc_status_mib("VmRSS") if Path("/proc/self/status").is_file() else 0.0  # libraries, no model
    model = load(args.model).to(args.device)
    if args.device == "cpu":
        private_copy_(model)
    params_dense = sum(p.numel() for p in model.parameters())
    if args.ratio > 0:
        targets = CausalLMSpec(model=model).default_targets(model)
        compress_(model, Recipe("svd", ratio=args.ratio, targets=targets))
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    # the dense weights were freed by compression: hand the pages back and restart the peak, so the
    # peak below is inference (weights + activations), not the compression that preceded it
    gc.collect()
    rss_reset = reset_peak_rss()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, vocab, (1, args.prompt), generator=g).to(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()

    def prefill():
        model(input_ids=prompt, use_cache=False)
        sync()

    def decode():
        model.generate(prompt[:, :16], max_new_tokens=args.new, min_new_tokens=args.new, do_sample=False,
                       pad_token_id=0)
        sync()

    prefill()  # warm-up
    t_prefill = best_of(prefill, args.repeats)
    decode()
    t_decode = best_of(decode, args.repeats)
    with FlopCounterMode(display=False) as counter:
        model(input_ids=prompt, use_cache=False)
    flops_per_token = counter.get_total_flops() / args.prompt
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**20
    elif rss_reset:
        peak = proc_status_mib("VmHWM") - rss_runtime
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024 - rss_start
    return {
        "ratio": args.ratio, "params": params, "params_dense": params_dense, "weight_mib": weight_bytes / 2**20,
        "peak_mib": peak, "prefill_tok_s": args.prompt / t_prefill, "decode_tok_s": args.new / t_decode,
        "flops_per_token": flops_per_token,
    }


def table(rows: list[dict], args: argparse.Namespace, command: str) -> str:
    dense = rows[0]
    lines = [
        "# Causal-LM efficiency: dense vs low-rank",
        "",
        f"Command: `{command}`",
        "",
        f"Model `{args.model}`, device `{args.device}`, {args.threads} threads, prompt {args.prompt} tokens, "
        f"decode {args.new} new tokens (greedy, KV cache), best of {args.repeats}. Peak memory: "
        + ("CUDA max allocated." if args.device.startswith("cuda") else
           "the process's peak RSS during inference minus its RSS before the model was loaded (so: weights + "
           "activations + allocator slack), with the peak counter reset after compression "
           "(`/proc/self/clear_refs`) so the dense copy compression started from is not included; the weights are "
           "copied out of the memory-mapped checkpoint file first, so replaced dense weights are really freed."),
        "",
        "| ratio | params | weights MiB | peak MiB | prefill tok/s | decode tok/s | GFLOP/token | "
        "prefill speed-up | FLOP bound |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = r["prefill_tok_s"] / dense["prefill_tok_s"]
        bound = dense["flops_per_token"] / r["flops_per_token"]
        lines.append(
            f"| {r['ratio']:.1f} | {r['params']:,} | {r['weight_mib']:.1f} | {r['peak_mib']:.0f} | "
            f"{r['prefill_tok_s']:.0f} | {r['decode_tok_s']:.1f} | {r['flops_per_token'] / 1e9:.3f} | "
            f"{speed:.2f}x | {bound:.2f}x |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="smollm2-135m", help="'smollm2-135m', a local path, or 'tiny'")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompt", type=int, default=256)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=None, help="markdown file for the table")
    p.add_argument("--ratio", type=float, default=0.0, help=argparse.SUPPRESS)  # worker mode
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    rows = []
    for ratio in [0.0, *args.ratios]:
        cmd = [sys.executable, __file__, "--worker", "--ratio", str(ratio), "--model", args.model,
               "--device", args.device, "--threads", str(args.threads), "--prompt", str(args.prompt),
               "--new", str(args.new), "--repeats", str(args.repeats)]
        out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        print(f"ratio {ratio}: {rows[-1]}", file=sys.stderr)
    command = "python benchmarks/llm_efficiency.py " + " ".join(sys.argv[1:])
    text = table(rows, args, command)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
