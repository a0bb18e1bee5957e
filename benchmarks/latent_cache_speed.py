"""Latent KV cache vs the plain cache at equal ranks: one decode step's time and the cache's bytes per token.

    .venv/bin/python benchmarks/latent_cache_speed.py --out docs/results/latent_cache.md

SmolLM2-135M with q/k/v factorized jointly (each ``--ratio`` of their parameters removed, plain SVD: the speed
does not depend on the method); copies of the same compressed model decode one token after a prefix of ``S``
tokens with

- ``plain``: transformers' ``DynamicCache`` (rotated keys and values; ``torch.cat`` copies it every step),
- ``plain in-place``: the same tensors appended into spare capacity (:class:`GrowingLayer`),
- ``latent keys``: ``keys="latent"``, ``r`` numbers per token; keys rebuilt as ``RoPE(U_k Z)`` every step,
  values folded into the output (``U_v (a Z)``),
- ``plain keys``: ``keys="plain"``, the rotated keys and ``z`` cached; values folded,
- ``auto keys``: ``keys="auto"``, ``plain keys`` on the layers whose rank ``r < kv_heads · head_dim``, the plain
  attention (and transformers' cache layer) on the others.

A uniform ``--ratio`` gives every layer the same rank, so ``auto`` is all ``plain keys`` or all plain there;
``--v2-ratio`` allocates the ranks per layer (``allocation: v2`` from the weights' spectra, no calibration), the
mixed case where ``auto`` keeps some layers plain.  Steps alternate between the models and the median of
``--steps`` is kept; one process, ``--threads`` threads, the OpenMP runtime's default wait policy
(``benchmarks/common.py``).
"""

from __future__ import annotations

import copy
import json
import os
import statistics
import sys
import time

os.environ.setdefault("SVD_VGGT_OMP_WAIT", "default")  # time what a user's process gets (see benchmarks/common.py)
import common  # noqa: E402 -- before torch: the OpenMP wait policy, the repository on sys.path
import torch  # noqa: E402
from common import lm_parser
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer

from compression import Recipe, compress_
from compression.joint import LATENT_NAME
from compression.latent_cache import enable_latent_cache_, kv_bytes_per_token
from compression.latent_cache_layers import GrowingLayer
from lightning_modules.specs import CausalLMSpec
from models.causal_lm import cache_keyword, load_causal_lm
from models.layouts import layout_of

NAMES = ("plain", "plain in-place", "latent keys", "plain keys", "auto keys")
KEYS = {"latent keys": "latent", "plain keys": "plain", "auto keys": "auto"}


def _in_place(plain: DynamicCache, config) -> DynamicCache:
    """The plain cache's tensors appended into :class:`GrowingLayer` s (what the same prefill would leave)."""
    cache = DynamicCache(config=config)
    if not all(type(layer) is DynamicLayer for layer in cache.layers):
        raise ValueError("plain in-place: expects full-attention layers only (SmolLM2)")
    cache.layers = [GrowingLayer() for _ in cache.layers]
    for layer, source in zip(cache.layers, plain.layers, strict=True):
        layer.update(source.keys, source.values)
    return cache


def measure(base, ratio: float, allocation: str, args) -> tuple[list[dict], dict]:
    model = copy.deepcopy(base)
    recipe = Recipe("svd", ratio=ratio, joint_qkv=True, allocation=allocation,
                    targets=["q_proj", "k_proj", "v_proj"])
    compress_(model, recipe, family=CausalLMSpec(model=model))
    models = {"plain": model, "plain in-place": model}
    swapped = {}
    for name, keys in KEYS.items():
        models[name] = copy.deepcopy(model)
        swapped[name] = len(enable_latent_cache_(models[name], layout_of(models[name]), keys=keys))
    layout = layout_of(model)
    ranks = [getattr(model.get_submodule(block.attn.path), LATENT_NAME).rank for block in layout.blocks]
    sizes = {keys: kv_bytes_per_token(model, layout, latent=True, keys=keys) for keys in KEYS.values()}
    sizes["ranks"] = [min(ranks), max(ranks)]
    sizes["auto_layers"] = [swapped["auto keys"], len(layout.blocks)]
    sizes["kv_width"] = layout.blocks[0].attn.kv_heads * layout.blocks[0].attn.head_dim
    label = f"{ratio}" if allocation == "uniform" else f"{ratio} ({allocation})"
    rows = []
    with torch.no_grad():
        for s in args.prefix:
            ids = torch.randint(100, 40000, (1, s))
            token = torch.randint(100, 40000, (1, 1))
            caches = {}
            for name, m in models.items():
                if name == "plain in-place":  # same model as "plain": its prefill, copied into in-place layers
                    caches[name] = _in_place(caches["plain"], m.config)
                    continue
                caches[name] = DynamicCache(config=m.config)
                m(ids, **{cache_keyword(m): caches[name]}, use_cache=True)
            times: dict[str, list[float]] = {name: [] for name in models}
            logits = {}
            for _ in range(args.steps):
                for name, m in models.items():
                    cache = {cache_keyword(m): copy.deepcopy(caches[name])}
                    t0 = time.perf_counter()
                    logits[name] = m(token, **cache, use_cache=True).logits
                    times[name].append(time.perf_counter() - t0)
            ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
            diff = max(float((logits[n] - logits["plain"]).abs().max()) for n in models)
            rows.append({"ratio": label, "S": s, **{k: round(v, 1) for k, v in ms.items()}, "max_logit_diff": diff})
            print(rows[-1], flush=True)
    return rows, sizes


def main() -> None:
    p = lm_parser(__doc__, eval_tokens=None)
    p.add_argument("--ratio", type=float, nargs="+", default=[0.4, 0.6], help="fractions of q/k/v parameters removed")
    p.add_argument("--v2-ratio", type=float, nargs="*", default=[],
                   help="the same, ranks allocated per layer (allocation: v2; a mixed case for keys='auto')")
    p.add_argument("--prefix", type=int, nargs="+", default=[64, 512, 2048], help="cached tokens S")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per model and prefix")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    base, _ = load_causal_lm(args.model)
    base.eval()
    rows, sizes = [], {}
    for ratio, allocation in [(r, "uniform") for r in args.ratio] + [(r, "v2") for r in args.v2_ratio]:
        r, size = measure(base, ratio, allocation, args)
        sizes[r[0]["ratio"]] = size
        rows += r
    text = render(rows, sizes, args)
    print(text)
    if args.out:
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "sizes": sizes}, indent=1))


def render(rows: list[dict], sizes: dict, args) -> str:
    lines = ["# Latent KV cache vs plain cache (SmolLM2-135M, joint q/k/v)", "",
             f"Command (one process, models alternating, median of the timed steps; {common.omp_note()}):", "",
             "    .venv/bin/python benchmarks/latent_cache_speed.py " + " ".join(sys.argv[1:]), "",
             "KV cache per token over all layers (values; bytes in 16-bit; in brackets the share of the plain cache):",
             "", "| q/k/v ratio | ranks | plain | latent keys | plain keys | auto keys | auto: plain-keys layers |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for label, sz in sizes.items():
        dense = sz["latent"]["dense_values"]
        cells = [f"{sz[k]['latent_values']} ({2 * sz[k]['latent_values']} B, {sz[k]['ratio']:.3f})"
                 for k in KEYS.values()]
        low, high = sz["ranks"]
        ranks = f"{low}" if low == high else f"{low}-{high}"
        lines.append(f"| {label} | {ranks} (keys {sz['kv_width']}) | {dense} ({2 * dense} B) | " + " | ".join(cells)
                     + f" | {sz['auto_layers'][0]} of {sz['auto_layers'][1]} |")
    ratios = [(n, "plain") for n in KEYS] + [("plain keys", "plain in-place"), ("auto keys", "plain in-place")]
    lines += ["", "Decode step (ms, one token after `S` cached tokens) and ratio to transformers' plain cache:", "",
              "| q/k/v ratio | S | " + " | ".join(f"{n} ms" for n in NAMES) + " | "
              + " | ".join(f"{a} / {b}" for a, b in ratios) + " | max logit diff |",
              "|---:|---:|" + "---:|" * (len(NAMES) + len(ratios) + 1)]
    for r in rows:
        lines.append(f"| {r['ratio']} | {r['S']} | " + " | ".join(f"{r[n]:.1f}" for n in NAMES) + " | "
                     + " | ".join(f"{r[a] / r[b]:.2f}" for a, b in ratios) + f" | {r['max_logit_diff']:.1e} |")
    lines += ["", "How the modes differ, per layer and step (`m_k = m_v = kv_heads · head_dim`, `H` query heads): "
              "`latent keys` stores `r` numbers per token and rebuilds `RoPE(U_k Z)` for all `S` tokens "
              "(`S r m_k` multiply-adds: RoPE rotates each key by its own position after `U_k`, so `U_k` cannot be "
              "folded into the query); `plain keys` stores `m_k + r` and reads the keys like the plain cache; both "
              "fold the values (`U_v (a Z)`, exact since the weights `a` sum to one), `H S r` multiply-adds "
              "instead of the plain cache's `H S head_dim`. `plain in-place` isolates what the in-place append "
              "saves over transformers' `torch.cat`, which copies the whole cache every step; `auto keys` keeps "
              "transformers' cache layer (and its `torch.cat`) on the layers it leaves plain. The logit "
              "differences are float32 rounding (the exactness tests run in float64)."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
