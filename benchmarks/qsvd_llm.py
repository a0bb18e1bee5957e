"""QSVD on a causal LLM (default SmolLM2-135M): joint QKV, allocation, rotations, β and W8A8 / W4A4.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/qsvd_llm.py --out docs/results/qsvd_llm.md

Only q/k/v are factorized (as in QSVD); ``--ratio`` is the fraction of their parameters removed,
and every SVD row keeps the same number of q/k/v parameters (the joint rank matches the
per-matrix budget; v2 / gradient allocation redistribute the uniform joint budget).
Calibration statistics and gradient importances are computed once on the dense model; joint
SVD with whitening commutes with the residual rotation (the optimum is equivariant under an
invertible change of input basis), so the fully rotated model is compressed in the original
basis and rotated afterwards.  Quantization is simulated (fake quant): weights RTN with a
clipping search, activations per token (clip 0.9), lm_head in float, no KV-cache quantization.
Perplexity: ``--eval-tokens`` tokens of non-overlapping ``--seq-len`` windows per test corpus.
"""

from __future__ import annotations

import copy
import json
import logging
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import lm_parser, lm_setup, perplexity, single_windows, spread

from compression import (
    ActQuantConfig,
    CompressionConfig,
    JointQKVConfig,
    WeightQuantConfig,
    build_method,
    collect_stats,
    compress_,
    compress_joint_,
    find_joint_groups,
    gradient_allocation,
    gradient_importance,
    joint_rank_for_ratio,
    quantize_model_,
)
from compression.allocation import v2_ratios
from compression.beta_search import search_beta_by_loss_
from compression.gradient_allocation import lm_loss
from compression.joint import LATENT_NAME, stacked_weight
from compression.latent_cache import enable_latent_cache_, kv_bytes_per_token
from compression.rotation import capture_inputs, rotate_model_, search_beta_
from models.layouts import layout_of

QKV = ("q_proj", "k_proj", "v_proj")


def qkv_params(model) -> int:
    total = 0
    for name, p in model.named_parameters():
        if ".self_attn." in name and any(k in name for k in (*QKV, LATENT_NAME)):
            total += p.numel()
    return total


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def main() -> None:
    p = lm_parser(__doc__, calib_samples=32, eval_tokens=4096)
    p.add_argument("--ratio", type=float, default=0.4, help="fraction of q/k/v parameters removed")
    p.add_argument("--grad-samples", type=int, default=16, help="calibration windows (batch 1) for gradients")
    p.add_argument("--beta-tokens", type=int, default=1024, help="calibration tokens per layer for the β search")
    p.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="W,A bit pairs")
    p.add_argument("--w-grid", type=int, default=20,
                   help="clip-search grid for weights (shrink step 1/grid down to 0.2; QuaRot uses 100)")
    p.add_argument("--loss-batches", type=int, default=4, help="calibration batches scoring each β candidate")
    p.add_argument("--loss-betas", type=float, nargs="+", default=[0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],
                   help="candidates of the global β chosen by calibration loss")
    p.add_argument("--quant-allocation", default="gradient", choices=["uniform", "v2", "gradient"])
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    setup = lm_setup(args.model, args.seq_len, args.calib_samples, args.eval_tokens)
    dense, tests = setup.model, setup.tests
    calib = [{"input_ids": b["input_ids"]} for b in setup.datamodule.calibration_dataloader()]
    rows: list[dict] = []

    def record(name: str, model, **extra) -> None:
        t0 = time.perf_counter()
        ppl = {k: perplexity(model, loader) for k, loader in tests.items()}
        rows.append({"row": name, "qkv_params": qkv_params(model),
                     "params": sum(q.numel() for q in model.parameters()), **ppl, **extra,
                     "eval_s": round(time.perf_counter() - t0, 1)})
        log(f"{name}: {ppl}")

    record("dense", dense)
    groups = find_joint_groups(dense, layout_of(dense))
    qkv_names = [n for names in groups.values() for n in names]
    t0 = time.perf_counter()
    stats = collect_stats(dense, qkv_names, calib)
    log(f"calibration {time.perf_counter() - t0:.0f} s")

    # -- float rows: per-matrix vs joint, and three allocations at one budget ---------------------
    model = copy.deepcopy(dense)
    rep = compress_(model, CompressionConfig("svd_llm", ratio=args.ratio, targets=list(QKV)), stats)
    record("SVD-LLM per-matrix q/k/v (uniform)", model, ratio_removed=round(rep.params_ratio, 4))
    del model

    first = next(iter(groups.values()))
    sizes = [dense.get_submodule(n).out_features for n in first]
    e = dense.get_submodule(first[0]).in_features
    shapes = {g: (sum(sizes), e) for g in groups}
    r_uniform = joint_rank_for_ratio(sizes, e, args.ratio)
    budget = len(groups) * r_uniform * (e + sum(sizes))
    method = build_method("svd_llm")
    spectra = {}
    for g, names in groups.items():
        w = stacked_weight([dense.get_submodule(n) for n in names])
        spectra[g] = method.spectrum(w, stats[names[0]], g).cpu()
    ratios = v2_ratios(shapes, spectra, args.ratio, 0.95, group_of=lambda n: "qkv")
    ranks_v2 = {g: joint_rank_for_ratio(sizes, e, ratios[g]) for g in groups}
    t0 = time.perf_counter()
    singles = single_windows(setup, args.grad_samples)
    importance = gradient_importance(dense, groups, singles, lm_loss, method, stats)
    grad_s = time.perf_counter() - t0
    log(f"gradient importance {grad_s:.0f} s")
    by_count = gradient_allocation(importance, shapes, budget=budget, mode="count")
    by_subset = gradient_allocation(importance, shapes, budget=budget, mode="subset")
    configs = {
        "uniform": JointQKVConfig("svd_llm", ratio=args.ratio),
        "v2": JointQKVConfig("svd_llm", ratio=args.ratio, ranks=ranks_v2),
        "gradient": JointQKVConfig("svd_llm", ratio=args.ratio, ranks=by_count.ranks),
        "gradient-subset": JointQKVConfig("svd_llm", ratio=args.ratio, components=by_subset.components),
    }
    allocations = {"uniform": dict.fromkeys(groups, r_uniform), "v2": ranks_v2, "gradient": by_count.ranks,
                   "gradient-subset": by_subset.ranks}
    latent_info = {}
    for name, cfg in configs.items():
        model = copy.deepcopy(dense)
        rep = compress_joint_(model, cfg, stats, layout=layout_of(model))
        record(f"joint QKV ({name})", model, ratio_removed=round(rep.params_ratio, 4))
        if name == args.quant_allocation:
            latent_info = latent_cache_check(model, calib[0]["input_ids"][:1, :64])
        del model

    # -- quantized rows ---------------------------------------------------------------------------
    betas_used = {}
    for pair in args.bits:
        wb, ab = (int(x) for x in pair.split(","))
        wq, aq = WeightQuantConfig(bits=wb, grid=args.w_grid), ActQuantConfig(bits=ab, clip_ratio=0.9)
        tag = f"W{wb}A{ab}"
        model = copy.deepcopy(dense)
        quantize_model_(model, wq, aq)
        record(f"{tag} RTN, no rotation, no SVD", model)
        del model
        model = copy.deepcopy(dense)
        rotate_model_(model, layout_of(model))
        quantize_model_(model, wq, aq)
        record(f"{tag} rotation only (QuaRot-style H1 + online H)", model)
        del model
        model = copy.deepcopy(dense)
        compress_joint_(model, configs[args.quant_allocation], stats, layout=layout_of(model))
        quantize_model_(model, wq, aq)
        record(f"{tag} joint SVD + quant (no rotations, β = 0.5)", model)
        del model
        for use_beta in (False, True):
            model = copy.deepcopy(dense)
            compress_joint_(model, configs[args.quant_allocation], stats, layout=layout_of(model))
            rotate_model_(model, layout_of(model))
            latents = [f"{g}.{LATENT_NAME}" for g in groups]
            inputs = capture_inputs(model, latents, calib, max_tokens=args.beta_tokens)
            betas = [0.5] if not use_beta else [i / 10 for i in range(11)]
            chosen = search_beta_(model, inputs, wq, aq, betas=betas, latent_seed=0)
            quantize_model_(model, wq, aq)
            if use_beta:
                betas_used[tag] = [c["beta"] for c in chosen.values()]
                record(f"{tag} full QSVD (H1 + online H + H2 + β search)", model)
            else:
                record(f"{tag} joint SVD + H1 + online H + H2 (β = 0.5)", model)
            del model
        model = copy.deepcopy(dense)
        compress_joint_(model, configs[args.quant_allocation], stats, layout=layout_of(model))
        rotate_model_(model, layout_of(model))
        found = search_beta_by_loss_(model, lm_loss, spread(calib, args.loss_batches), wq, aq,
                                     betas=args.loss_betas)
        quantize_model_(model, wq, aq)
        betas_used[f"{tag} by calibration loss (one global β)"] = found["beta"]
        record(f"{tag} full QSVD (H1 + online H + H2 + β by calibration loss)", model)
        del model

    out = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "budget_qkv_params": budget,
           "allocations": allocations, "betas": betas_used, "latent_cache": latent_info,
           "gradient_seconds": grad_s, "total_seconds": time.perf_counter() - t_start}
    text = table(out, dense)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))


@torch.no_grad()
def latent_cache_check(model, prompt: torch.Tensor, new_tokens: int = 32) -> dict:
    """Greedy tokens with and without the latent cache, decode time of each, KV bytes per token (fp16)."""
    plain = copy.deepcopy(model)
    latent = model
    enable_latent_cache_(latent, layout_of(latent))
    res = {}
    for name, m in (("plain", plain), ("latent", latent)):
        t0 = time.perf_counter()
        seq = m.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=new_tokens,
                         do_sample=False, pad_token_id=0)
        res[f"{name}_seconds"] = round(time.perf_counter() - t0, 2)
        res[f"{name}_tokens"] = seq[0, prompt.shape[1]:].tolist()
    res["identical"] = res["plain_tokens"] == res["latent_tokens"]
    res.update(kv_bytes_per_token(latent, layout_of(latent), latent=True, bytes_per_value=2))
    del res["plain_tokens"], res["latent_tokens"]
    return res


def table(out: dict, dense) -> str:
    rows = out["rows"]
    tests = [k for k in rows[0] if k not in ("row", "qkv_params", "params", "eval_s", "ratio_removed")]
    lines = [
        f"# QSVD on {out['args']['model']}",
        "",
        "Command (2 CPU threads, ~{:.0f} min):".format(out["total_seconds"] / 60),
        "",
        "    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/qsvd_llm.py --out docs/results/qsvd_llm.md",
        "",
        f"Settings: {json.dumps(out['args'])}",
        "",
        "Perplexity on held-out corpora (calibration: Shakespeare comedies + Wikipedia `calib` split; "
        "`tragedies` = Shakespeare tragedies test plays, `wiki` = Wikipedia `test` split, "
        "neither used in calibration).",
        "q/k/v params = stored parameters of q/k/v (shared latent down counted once).",
        "",
        "| row | q/k/v params | " + " | ".join(f"ppl {t}" for t in tests) + " |",
        "|---|---:|" + "---:|" * len(tests),
    ]
    for r in rows:
        lines.append(f"| {r['row']} | {r['qkv_params']:,} | " + " | ".join(f"{r[t]:.2f}" for t in tests) + " |")
    alloc = out["allocations"]
    lines += ["", f"Joint budget: {out['budget_qkv_params']:,} q/k/v parameters (dense "
              f"{rows[0]['qkv_params']:,}).  Per-layer joint ranks:", ""]
    for name, ranks in alloc.items():
        lines.append(f"- {name}: {list(ranks.values())}")
    if out["betas"]:
        lines += ["", "β chosen on calibration data (per layer by the quantized q/k/v output error, or one global β "
                  "by the quantized model's calibration loss):", ""]
        lines += [f"- {k}: {v}" for k, v in out["betas"].items()]
    lc = out["latent_cache"]
    if lc:
        lines += ["", "Latent KV cache (joint QKV, quant allocation, float): "
                  f"greedy tokens identical to the plain cache: {lc['identical']}; "
                  f"KV values per token over all layers {lc['latent_values']} vs {lc['dense_values']} "
                  f"({lc['latent_bytes']:.0f} vs {lc['dense_bytes']:.0f} bytes in fp16, ratio {lc['ratio']:.3f}); "
                  f"32-token greedy decode {lc['latent_seconds']} s (latent) vs {lc['plain_seconds']} s (plain)."]
    lines += ["", f"Gradient importance: {out['gradient_seconds']:.0f} s."]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
