"""Latent KV cache vs the plain cache at equal ranks: one decode step's time and the cache's bytes per token.

    .venv/bin/python benchmarks/latent_cache_speed.py --out docs/results/latent_cache.md

SmolLM2-135M with q/k/v factorized jointly (``--ratio`` of their parameters removed, plain SVD: the speed does not
depend on the method), then three copies of the same compressed model decode one token after a prefix of
``S`` tokens: the plain cache (rotated keys and values cached), the latent cache (``r`` numbers per token;
keys rebuilt as ``RoPE(U_k Z)`` every step, values folded into the output: ``U_v (a Z)``), and the latent
cache rebuilding the values too (the behaviour before the fold).  Steps alternate between the three models
and the median of ``--steps`` is kept; one process, ``--threads`` threads.
"""

from __future__ import annotations

import copy
import json
import statistics
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import lm_parser

from compression import Recipe, compress_
from compression.latent_cache import LatentAttention, enable_latent_cache_, kv_bytes_per_token
from lightning_modules.specs import CausalLMSpec
from models.causal_lm import load_causal_lm
from models.layouts import layout_of


def main() -> None:
    p = lm_parser(__doc__, eval_tokens=None)
    p.add_argument("--ratio", type=float, default=0.4, help="fraction of q/k/v parameters removed")
    p.add_argument("--prefix", type=int, nargs="+", default=[64, 512, 2048], help="cached tokens S")
    p.add_argument("--steps", type=int, default=15, help="timed decode steps per model and prefix")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, _ = load_causal_lm(args.model)
    model.eval()
    recipe = Recipe("svd", ratio=args.ratio, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"])
    compress_(model, recipe, family=CausalLMSpec(model=model))
    latent = copy.deepcopy(model)
    enable_latent_cache_(latent, layout_of(latent))
    rebuild = copy.deepcopy(latent)
    for m in rebuild.modules():
        if isinstance(m, LatentAttention):
            m._absorbs = lambda q_len: False  # the path that rebuilds U_v Z every step
    models = {"plain cache": model, "latent (values folded)": latent, "latent (values rebuilt)": rebuild}
    from transformers import DynamicCache

    rows = []
    with torch.no_grad():
        for s in args.prefix:
            ids = torch.randint(100, 40000, (1, s))
            token = torch.randint(100, 40000, (1, 1))
            caches = {}
            for name, m in models.items():
                caches[name] = DynamicCache(config=m.config)
                m(ids, past_key_values=caches[name], use_cache=True)
            times: dict[str, list[float]] = {name: [] for name in models}
            logits = {}
            for _ in range(args.steps):
                for name, m in models.items():
                    cache = copy.deepcopy(caches[name])
                    t0 = time.perf_counter()
                    logits[name] = m(token, past_key_values=cache, use_cache=True).logits
                    times[name].append(time.perf_counter() - t0)
            ms = {name: 1000 * statistics.median(v) for name, v in times.items()}
            diff = max(float((logits[n] - logits["plain cache"]).abs().max()) for n in models)
            rows.append({"S": s, **{k: round(v, 1) for k, v in ms.items()}, "max_logit_diff": diff})
            print(rows[-1], flush=True)
    sizes = kv_bytes_per_token(latent, layout_of(latent), latent=True, bytes_per_value=2)
    text = render(rows, sizes, args)
    print(text)
    if args.out:
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps({"rows": rows, "sizes": sizes}, indent=1))


def render(rows: list[dict], sizes: dict, args) -> str:
    names = [k for k in rows[0] if k not in ("S", "max_logit_diff")]
    lines = ["# Latent KV cache vs plain cache (SmolLM2-135M, joint q/k/v)", "",
             "Command (one process, models alternating, median of the timed steps):", "",
             f"    .venv/bin/python benchmarks/latent_cache_speed.py --ratio {args.ratio} "
             f"--threads {args.threads} --steps {args.steps} --out docs/results/latent_cache.md", "",
             f"q/k/v ratio {args.ratio}; KV values per token over all layers: latent {sizes['latent_values']} vs "
             f"plain {sizes['dense_values']} ({sizes['latent_bytes']:.0f} vs {sizes['dense_bytes']:.0f} bytes in "
             f"16-bit, ratio {sizes['ratio']:.3f}).", "",
             "| cached tokens S | " + " | ".join(f"{n} ms/step" for n in names)
             + " | latent / plain | max logit diff |",
             "|---:|" + "---:|" * (len(names) + 2)]
    for r in rows:
        ratio = r["latent (values folded)"] / r["plain cache"]
        lines.append(f"| {r['S']} | " + " | ".join(f"{r[n]:.1f}" for n in names)
                     + f" | {ratio:.2f} | {r['max_logit_diff']:.1e} |")
    lines += ["", "Reading: the plain cache reads the rotated keys and values; the latent cache stores `r` numbers "
              "per token and pays `S r m_k` multiply-adds per layer and step to rebuild the keys (RoPE rotates each "
              "key by its own position after `U_k`, so the key side cannot be folded into the query). Folding the "
              "values (`U_v (a Z)`, exact since the attention weights sum to one) removes the other `S r m_v`. "
              "At equal ranks the latent cache is therefore slower than the plain cache, increasingly with `S`; "
              "it is a memory trade, not a speed-up, on this CPU."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
