"""QSVD on a causal LLM (default SmolLM2-135M): joint QKV, allocation, rotations, β and W8A8 / W4A4.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/qsvd_llm.py --out docs/results/qsvd_llm.md

Only q/k/v are factorized (as in QSVD); ``--ratio`` is the fraction of their parameters removed,
and every SVD row keeps at most ``(1 - ratio)`` of the q/k/v parameters (the joint rank matches the
per-matrix budget; v2 / gradient allocation redistribute that budget).  Every row is one
:class:`compression.Recipe` run by ``compress_`` on a copy of the dense model; calibration
statistics and gradient importances are computed once on the dense model and handed to it.
Quantization is simulated (fake quant): weights RTN with a clipping search, activations per token
(clip 0.9), lm_head in float, no KV-cache quantization.
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
from common import lm_parser, lm_setup, perplexity, single_windows

from compression import Recipe, collect_stats, compress_, find_joint_groups, gradient_importance
from compression.gradient_allocation import lm_loss
from compression.joint import LATENT_NAME
from compression.latent_cache import enable_latent_cache_, kv_bytes_per_token
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
    t0 = time.perf_counter()
    importance = gradient_importance(dense, groups, single_windows(setup, args.grad_samples), lm_loss, "svd_llm",
                                     stats)
    grad_s = time.perf_counter() - t0
    log(f"gradient importance {grad_s:.0f} s")

    def compressed(recipe: Recipe):
        """A copy of the dense model with ``recipe`` applied through the one entry point."""
        model = copy.deepcopy(dense)
        report = compress_(model, recipe, stats, family=setup.spec, batches=calib, importances=importance)
        return model, report

    # -- float rows: per-matrix vs joint, and the allocations at one budget -----------------------
    model, rep = compressed(Recipe("svd_llm", ratio=args.ratio, targets=list(QKV)))
    record("SVD-LLM per-matrix q/k/v (uniform)", model, ratio_removed=round(rep.params_ratio, 4))
    del model
    joint = {"method": "svd_llm", "ratio": args.ratio, "targets": list(QKV), "joint_qkv": True}
    allocations = {"uniform": {"allocation": "uniform"}, "v2": {"allocation": "v2"},
                   "gradient": {"allocation": "gradient"},
                   "gradient-subset": {"allocation": "gradient", "components": "chosen"}}
    ranks_used, latent_info = {}, {}
    for name, fields in allocations.items():
        model, rep = compressed(Recipe(**joint, **fields))
        ranks_used[name] = {g: spec["rank"] for g, spec in rep.plan["joint_groups"].items()}
        record(f"joint QKV ({name})", model, ratio_removed=round(rep.params_ratio, 4))
        if name == args.quant_allocation:
            latent_info = latent_cache_check(model, calib[0]["input_ids"][:1, :64])
        del model
    budget = rep.targeted_params_after  # q/k/v parameters kept by the last joint row

    # -- quantized rows ---------------------------------------------------------------------------
    betas_used = {}
    lowrank = {**joint, **allocations[args.quant_allocation]}
    for pair in args.bits:
        wb, ab = (int(x) for x in pair.split(","))
        tag = f"W{wb}A{ab}"
        bits = {"weight_bits": wb, "act_bits": ab, "clip_grid": args.w_grid, "act_clip_ratio": 0.9,
                "calibration_tokens": args.beta_tokens, "max_batches": None}
        rows_q = [
            (f"{tag} RTN, no rotation, no SVD", Recipe(None, quantization={**bits, "rotate": False})),
            (f"{tag} rotation only (QuaRot-style H1 + online H)", Recipe(None, quantization={**bits, "rotate": True})),
            (f"{tag} joint SVD + quant (no rotations, β = 0.5)",
             Recipe(**lowrank, quantization={**bits, "rotate": False, "latent_rotation": False})),
            (f"{tag} joint SVD + H1 + online H + H2 (β = 0.5)",
             Recipe(**lowrank, quantization={**bits, "rotate": True})),
            (f"{tag} full QSVD (H1 + online H + H2 + β search)",
             Recipe(**lowrank, quantization={**bits, "rotate": True, "beta_search": True})),
            (f"{tag} full QSVD (H1 + online H + H2 + β by calibration loss)",
             Recipe(**lowrank, quantization={**bits, "rotate": True, "beta_search": True, "beta_objective": "loss",
                                             "betas": args.loss_betas, "max_batches": args.loss_batches})),
        ]
        for label, recipe in rows_q:
            model, rep = compressed(recipe)
            quant = rep.plan["quantization"]
            if recipe.quantization.beta_search and recipe.quantization.beta_objective == "output":
                betas_used[tag] = list(quant["beta"].values())
            elif recipe.quantization.beta_search:
                betas_used[f"{tag} by calibration loss (one global β)"] = next(iter(quant["beta"].values()))
            record(label, model)
            del model

    out = {"args": {k: str(v) for k, v in vars(args).items()}, "rows": rows, "budget_qkv_params": budget,
           "allocations": ranks_used, "betas": betas_used, "latent_cache": latent_info,
           "gradient_seconds": grad_s, "total_seconds": time.perf_counter() - t_start}
    text = table(out, dense)
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        common.write_keeping_notes(args.out, text)
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
