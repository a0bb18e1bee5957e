"""Peak memory of all-at-once vs block-sequential compression for LLaMA-7B/13B/70B shapes, counted on the meta device.

    python benchmarks/sequential_count.py --out docs/results/sequential_count.md

Each model is built from its config on the ``meta`` device (no weights are allocated); one decoder block
runs on meta tensors with pre-hooks on its linears, which see which layers read the same tensor, so the
statistics streams (one float64 Gram ``n x n`` per distinct input, what ``svd_llm`` collects) are
counted exactly as :class:`compression.StatsCollector` forms them.  Terms (bytes):

- ``W`` whole model, ``w`` one block (``--dtype``), ``G`` one block's Grams, ``L`` blocks;
- ``A`` the calibration hidden states: samples x tokens x hidden x dtype; ``a`` one batch's.

All-at-once (today): the device holds ``W + L·G`` (+ one batch).  Sequential, ``activations: device``:
``w + G + 2A`` (inputs and dense outputs of every batch); ``activations: host``: ``w + G + 3a`` on the
device, ``2A`` on the host.  Not counted (the same in both modes): the per-batch workspace of one block's
forward and the float64 workspace of one matrix's decomposition.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch (see benchmarks/common.py)
if str(Path(__file__).resolve().parents[1]) not in sys.path:  # run as a script or imported by a test
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from torch import nn  # noqa: E402

SHAPES = {  # LLaMA-1/2 shapes (hidden, intermediate, layers, heads, kv heads)
    "LLaMA-7B": (4096, 11008, 32, 32, 32),
    "LLaMA-13B": (5120, 13824, 40, 40, 40),
    "LLaMA-70B": (8192, 28672, 80, 64, 8),
}
DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def meta_llama(hidden: int, inter: int, layers: int, heads: int, kv: int, dtype: torch.dtype) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
                         num_attention_heads=heads, num_key_value_heads=kv, max_position_embeddings=4096)
    with torch.device("meta"):
        return LlamaForCausalLM(config).to(dtype)


@torch.no_grad()
def block_streams(model: nn.Module, index: int = 0, tokens: int = 16) -> dict[str, int]:
    """``first layer -> input channels`` of every distinct input tensor of block ``index``'s linears
    (layers reading the same tensor share one entry), from one forward of the block on meta tensors."""
    from models.layouts import layout_of

    layout = layout_of(model)
    block = model.get_submodule(layout.blocks[index].path)
    hidden = torch.zeros(1, tokens, layout.hidden, device="meta", dtype=next(model.parameters()).dtype)
    positions = torch.arange(tokens, device="meta")[None]
    rotary = model.get_submodule(layout.blocks[index].attn.rotary) if layout.blocks[index].attn.rotary else None
    streams: dict[str, int] = {}
    last: list = [None, None]

    def hook(name: str):
        def fn(module: nn.Module, args: tuple) -> None:
            if last[0] is args[0]:
                return  # the same tensor as the previous linear's input: one shared stream
            last[0], last[1] = args[0], name
            streams[name] = args[0].shape[-1]
        return fn

    handles = [m.register_forward_pre_hook(hook(n)) for n, m in block.named_modules() if isinstance(m, nn.Linear)]
    try:
        kwargs = {"position_embeddings": rotary(hidden, positions)} if rotary is not None else {}
        block(hidden, attention_mask=None, position_ids=positions, **kwargs)
    finally:
        for h in handles:
            h.remove()
    return streams


def count(name: str, dtype: torch.dtype, samples: int, seq_len: int, batch: int) -> dict:
    hidden, inter, layers, heads, kv = SHAPES[name]
    model = meta_llama(hidden, inter, layers, heads, kv, dtype)
    size = torch.empty((), dtype=dtype).element_size()
    whole = sum(p.numel() for p in model.parameters()) * size
    block = sum(p.numel() for p in model.model.layers[0].parameters()) * size
    gram = sum(8 * n * n for n in block_streams(model).values())
    acts = samples * seq_len * hidden * size
    one = batch * seq_len * hidden * size
    return {"model": name, "params": sum(p.numel() for p in model.parameters()), "layers": layers,
            "W": whole, "w": block, "G": gram, "A": acts, "a": one,
            "all_at_once": whole + layers * gram + one, "seq_device": block + gram + 2 * acts,
            "seq_host": block + gram + 3 * one, "seq_host_ram": 2 * acts}


def gib(x: float) -> str:
    return f"{x / 2**30:.2f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--dtype", default="float16", choices=list(DTYPES))
    p.add_argument("--samples", type=int, default=256, help="calibration windows (SVD-LLM's default: 256)")
    p.add_argument("--seq-len", type=int, default=2048, help="tokens per window")
    p.add_argument("--batch-size", type=int, default=8, help="calibration windows per batch")
    p.add_argument("--out", default=None, help="markdown output")
    args = p.parse_args()
    rows = [count(m, DTYPES[args.dtype], args.samples, args.seq_len, args.batch_size) for m in args.models]
    command = "python benchmarks/sequential_count.py " + " ".join(sys.argv[1:])
    lines = [
        "## Counted peak device memory: LLaMA-7B / 13B / 70B shapes (meta device)",
        "",
        f"Command: `{command}`",
        "",
        f"Weights in {args.dtype}; statistics: the float64 Grams `svd_llm` / `svd_llm_v2` collect (one per distinct "
        f"input: 3 of `hidden` and 1 of `intermediate` channels per LLaMA block, found by hooks on a meta forward); "
        f"calibration {args.samples} x {args.seq_len} tokens, batches of {args.batch_size}. GiB.",
        "",
        "| model | params | blocks | weights W | one block w | Grams per block G | all Grams L·G | activations A "
        "| **all-at-once** W + L·G + a | **sequential, activations on device** w + G + 2A "
        "| **sequential, activations on host** w + G + 3a (host: 2A) | all-at-once / sequential (host) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e9:.2f} B | {r['layers']} | {gib(r['W'])} | {gib(r['w'])} | "
                     f"{gib(r['G'])} | {gib(r['layers'] * r['G'])} | {gib(r['A'])} | {gib(r['all_at_once'])} | "
                     f"{gib(r['seq_device'])} | {gib(r['seq_host'])} ({gib(r['seq_host_ram'])}) | "
                     f"{r['all_at_once'] / r['seq_host']:.0f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
