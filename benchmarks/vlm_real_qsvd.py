"""QSVD table on the real offline VLM (CLIP ViT-B/16 + trained projector + SmolLM2-135M), both VQA layouts.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vlm_real_qsvd.py \
        --model outputs/vlm/clip_smollm2_scan/version_0/pretrained --scienceqa-format scan \
        --out docs/results/vlm_real_qsvd.md

The model is the output of ``configs/vlm/clip_smollm2_scan.yaml`` (both layouts far above chance; the letter-only
models of the other clip_smollm2 configs answer the ScienceQA layout at chance), scored in the ScienceQA answer
format it was trained on (``--scienceqa-format``).  Test: the first
``--test-samples`` questions of each layout of the labelled sets (:mod:`data.vqa.labelled`; Fashion-MNIST
t10k and held-out digit images, half each), scored as the CLI scores them (greedy answers; ScienceQA: the
option letter parsed, chance 25 %; VizWiz: soft VQA accuracy, chance 10 % for a uniform guess).
Calibration: ``--calib-samples`` training-split questions per layout (batch 1), never a test image.

Rows (the QSVD paper's LLaVA table): every row is one :class:`compression.Recipe` run by ``compress_`` on
a copy of the dense model, with calibration statistics and gradient importances computed once on the
dense model.  ``R1`` = fraction of the language model's q/k/v parameters kept (recipe ratio = 1 - R1; the
joint factorization keeps the same parameter budget).  SVD-LLM and ASVD factor q, k, v per matrix at a
uniform ratio; QSVD factors each attention's ``[W_q; W_k; W_v]`` jointly, with ASVD scaling (abs-mean,
alpha 0.5) and gradient rank allocation, as the QSVD code.  Quantized rows (fake quant: RTN weights with a
clipping search, per-token activations clipped at 0.9, lm_head in float) at R1 = 100 % (ratio 0.001, the
paper's quantized setting); ``--quantize-vision`` also quantizes the CLIP tower (unrotated).
Per-tower rows select other targets (vision tower q/k/v, projector) to show the split of parameters and
FLOPs per part.
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import sys
import time
from pathlib import Path

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch

from compression import Recipe, collect_stats, compress_
from compression.api import prepare
from data.vqa.mix import VQAMixDataModule
from lightning_modules.vlm_spec import VLMSpec
from metrics.flops import vlm_costs
from metrics.vqa import VQAScores
from models.vlm import load_vlm

LM_QKV = "model.language_model.layers.*.self_attn.[qkv]_proj"
VISION_QKV = "model.vision_tower.*.self_attn.[qkv]_proj"
PROJECTOR = "model.multi_modal_projector.linear_[12]"
ASVD = {"method": "asvd", "method_args": {"scaling": "abs_mean", "alpha": 0.5}}
COMMAND = "flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vlm_real_qsvd.py"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def isolating_rows(r1: float, grad_samples: int) -> list[tuple[str, Recipe, str]]:
    """The 2 x 2 around QSVD's factorization at ``r1``, all with joint q/k/v: {ASVD scaling, SVD-LLM whitening} x
    {uniform ranks, gradient allocation}; QSVD is (ASVD, gradient).  A whitened row computes its own gradient
    importances (the singular values it ranks are those of the whitened matrix)."""
    ratio = round(1 - r1, 6)
    grad = {"allocation": "gradient", "calibration": {"gradient_batches": grad_samples, "progress": False}}
    joint = {"ratio": ratio, "targets": [LM_QKV], "joint_qkv": True}
    return [
        (f"joint QKV, SVD-LLM whitening, gradient alloc. (QSVD without ASVD scaling) R1 {r1:.0%}",
         Recipe("svd_llm", **joint, **grad), "isolate"),
        (f"joint QKV, SVD-LLM whitening, uniform ranks R1 {r1:.0%}", Recipe("svd_llm", **joint), "isolate"),
        (f"joint QKV, ASVD scaling, uniform ranks (QSVD without gradient alloc.) R1 {r1:.0%}",
         Recipe(**ASVD, **joint), "isolate"),
    ]


def rows(r1s: list[float], bits: list[tuple[int, int]], quant_budget: float,
         grad_samples: int = 16) -> list[tuple[str, Recipe | None, str]]:
    """``(label, recipe, group)`` in run order: the paper's headline comparisons first (SVD-LLM / ASVD / QSVD at
    the lowest R1, QuaRot vs QSVD at the lowest bits), the rows that isolate QSVD's scaling and allocation at the
    lowest R1, then the other budgets and bit widths, per-tower rows last, so that a run cut short still holds the
    rows that matter most."""
    float_rows, quant_rows = {}, {}
    for r1 in r1s:
        ratio = round(1 - r1, 6)
        float_rows[r1] = [
            (f"SVD-LLM R1 {r1:.0%}", Recipe("svd_llm", ratio=ratio, targets=[LM_QKV]), "float"),
            (f"ASVD R1 {r1:.0%}", Recipe(**ASVD, ratio=ratio, targets=[LM_QKV]), "float"),
            (f"QSVD (no quant.) R1 {r1:.0%}",
             Recipe(**ASVD, ratio=ratio, targets=[LM_QKV], joint_qkv=True, allocation="gradient"), "float"),
        ]
    for wb, ab in bits:
        tag = f"W{wb}A{ab}"
        q = {"weight_bits": wb, "act_bits": ab, "clip_grid": 20, "act_clip_ratio": 0.9, "calibration_tokens": 1024,
             "max_batches": 8}
        joint = {**ASVD, "ratio": quant_budget, "targets": [LM_QKV], "joint_qkv": True, "allocation": "gradient"}
        quant_rows[(wb, ab)] = [
            (f"{tag} QuaRot-style (rotation only)", Recipe(None, quantization={**q, "rotate": True}), tag),
            (f"{tag} QSVD (H1 + online H + H2 + beta search)",
             Recipe(**joint, quantization={**q, "rotate": True, "beta_search": True}), tag),
            (f"{tag} RTN (no rotation, no SVD)", Recipe(None, quantization={**q, "rotate": False}), tag),
            (f"{tag} QSVD without rotations", Recipe(**joint, quantization={**q, "rotate": False,
                                                                                "latent_rotation": False}), tag),
        ]
    low_r1, low_bits = min(r1s), min(bits)
    out: list[tuple[str, Recipe | None, str]] = [("FP32 dense (FP16 row)", None, "float")]
    out += float_rows[low_r1] + quant_rows[low_bits][:2] + isolating_rows(low_r1, grad_samples)
    out += [r for r1 in sorted(r1s) if r1 != low_r1 for r in float_rows[r1]]
    out += [r for b in sorted(bits, reverse=True) if b != low_bits for r in quant_rows[b]] + quant_rows[low_bits][2:]
    r1 = max(r1s)
    ratio = round(1 - r1, 6)
    out += [
        (f"QSVD R1 {r1:.0%} on the vision tower only", Recipe(**ASVD, ratio=ratio, targets=[VISION_QKV],
                                                               joint_qkv=True), "towers"),
        (f"QSVD R1 {r1:.0%} on vision + language q/k/v, SVD-LLM on the projector",
         Recipe(**ASVD, ratio=ratio, targets=[LM_QKV, VISION_QKV, PROJECTOR], joint_qkv=True), "towers"),
    ]
    return out


@torch.no_grad()
def score(spec: VLMSpec, model, loaders: dict) -> dict[str, dict[str, float]]:
    out = {}
    for name, loader in loaders.items():
        metrics = VQAScores()
        for i, batch in enumerate(loader):
            spec.evaluate(model, batch, metrics, i)
        out[name] = {k: float(v) for k, v in metrics.compute().items()}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="the trained save_pretrained folder (or clip-smollm2: untrained)")
    p.add_argument("--test-samples", type=int, default=40, help="test questions per layout (half per dataset)")
    p.add_argument("--calib-samples", type=int, default=16, help="training questions per layout for calibration")
    p.add_argument("--grad-samples", type=int, default=16, help="calibration questions for gradient importance")
    p.add_argument("--r1", type=float, nargs="+", default=[0.6, 0.8], help="fractions of LM q/k/v kept")
    p.add_argument("--bits", nargs="+", default=["8,8", "4,4"], help="W,A bit pairs")
    p.add_argument("--quant-ratio", type=float, default=0.001, help="ratio of the quantized QSVD rows (R1 ~ 100 %%)")
    p.add_argument("--quantize-vision", action="store_true", help="also quantize the CLIP tower (unrotated)")
    p.add_argument("--only", nargs="*", default=None, help="run only the rows whose label starts with one of these")
    p.add_argument("--scienceqa-format", choices=["letter", "explained", "scan"], default="letter",
                   help="ScienceQA answer format the model was trained on (data.vqa.scienceqa)")
    p.add_argument("--max-new-tokens", type=int, default=None,
                   help="greedy decoding budget (default: 6 for the letter format, 16 for explained, 40 for scan)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="markdown output (a .json twin is written next to it)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    dense, processor = load_vlm(args.model)
    if args.max_new_tokens is None:
        args.max_new_tokens = {"letter": 6, "explained": 16, "scan": 40}[args.scienceqa_format]
    spec = VLMSpec(model=dense, processor=processor, max_new_tokens=args.max_new_tokens, eval_loss=False,
                   quantize_vision=args.quantize_vision, compress_vision=True, compress_projector=True)
    dm = VQAMixDataModule(root="labelled", processor=processor, calibration_samples=args.calib_samples,
                          test_samples=args.test_samples, eval_batch_size=25, scienceqa_format=args.scienceqa_format)
    loaders = dict(zip(dm.test_names, dm.test_dataloader()))
    calib = list(dm.calibration_dataloader())
    first = next(iter(next(iter(loaders.values()))))["full"]
    example = {k: v[:1] for k, v in first.items() if k != "labels"}  # one test question, for the FLOP count
    bits = [tuple(int(x) for x in b.split(",")) for b in args.bits]
    plan = rows(args.r1, bits, args.quant_ratio, args.grad_samples)
    if args.only:
        plan = [r for r in plan if r[0] == plan[0][0] or any(r[0].startswith(o) for o in args.only)]

    t0 = time.perf_counter()
    targets = [n for n, _ in dense.named_modules() if ".self_attn." in n and n.rsplit(".", 1)[-1] in
               ("q_proj", "k_proj", "v_proj")]
    targets += [n for n, _ in dense.named_modules() if n.startswith("model.multi_modal_projector.linear_")]
    stats = collect_stats(dense, targets, calib, forward=spec.calibration_forward)
    stats_s = time.perf_counter() - t0
    log(f"calibration statistics ({len(calib)} questions, {len(targets)} layers): {stats_s:.0f} s")
    importances, grad_s = None, 0.0
    if any(r[1] is not None and r[1].allocation == "gradient" for r in plan):
        t0 = time.perf_counter()
        grad_recipe = Recipe(**ASVD, ratio=0.2, targets=[LM_QKV], joint_qkv=True, allocation="gradient",
                             calibration={"gradient_batches": args.grad_samples, "progress": False})
        importances = prepare(dense, grad_recipe, stats, family=spec, batches=calib).importances
        grad_s = time.perf_counter() - t0
        log(f"gradient importance ({args.grad_samples} questions): {grad_s:.0f} s")

    results: list[dict] = []

    def save() -> None:
        out = {"command": f"{COMMAND} {shlex.join(sys.argv[1:])}",
               "args": {k: str(v) for k, v in vars(args).items()}, "rows": results,
               "statistics_seconds": stats_s, "gradient_seconds": grad_s,
               "total_seconds": time.perf_counter() - t_start}
        if args.out:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
            common.write_keeping_notes(args.out, table(out))

    for label, recipe, group in plan:
        model, report, t0 = dense, None, time.perf_counter()
        if recipe is not None:
            model = copy.deepcopy(dense)
            # the shared importances are those of the ASVD-scaled joint factorization (grad_recipe)
            uses_grad = recipe.allocation == "gradient" and recipe.targets == [LM_QKV] and recipe.method == "asvd"
            report = compress_(model, recipe, stats, family=spec, batches=calib,
                               importances=importances if uses_grad else None)
        compress_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        acc = score(spec, model, loaders)
        eval_s = time.perf_counter() - t0
        row = {"row": label, "group": group, "accuracy": acc, "compress_seconds": round(compress_s, 1),
               "eval_seconds": round(eval_s, 1), "towers": vlm_costs(model, example),
               "params": sum(q.numel() for q in model.parameters())}
        if report is not None and report.layers:
            row["targeted_params"] = [report.targeted_params_before, report.targeted_params_after]
        results.append(row)
        log(f"{label}: {acc} ({compress_s:.0f} s + {eval_s:.0f} s)")
        save()
        if model is not dense:
            del model


def table(out: dict) -> str:
    rows_ = out["rows"]
    names = list(rows_[0]["accuracy"])
    stated = [n for n in names if "answer_sentence" in rows_[0]["accuracy"][n]]  # ScienceQA sets (newer runs)
    dense = rows_[0]
    lines = [
        "| row | " + " | ".join(f"{n} acc. (%)" for n in names)
        + "".join(f" | {n} with 'answer is X' (%)" for n in stated) + " | targeted params kept | vision / projector / "
        "LM params | vision / LM GFLOPs | compress + eval (s) |",
        "|---|" + "---:|" * (len(names) + len(stated)) + "---:|---:|---:|---:|",
    ]
    for r in rows_:
        t = r["towers"]
        kept = ""
        if "targeted_params" in r:
            before, after = r["targeted_params"]
            kept = f"{after:,} / {before:,}"
        accs = " | ".join([f"{r['accuracy'][n]['accuracy']:.1f}" for n in names]
                          + [f"{r['accuracy'][n]['answer_sentence']:.1f}" for n in stated])
        lines.append(f"| {r['row']} | {accs} | {kept} | {t['vision_tower']['params'] / 1e6:.2f} M / "
                     f"{t['projector']['params'] / 1e6:.3f} M / {t['language_model']['params'] / 1e6:.2f} M | "
                     f"{t['vision_tower']['gflops']:.2f} / {t['language_model']['gflops'] + t['lm_head']['gflops']:.2f}"
                     f" | {r['compress_seconds']:.0f} + {r['eval_seconds']:.0f} |")
    head = [
        "Command (2 CPU threads, {:.0f} min in all):".format(out["total_seconds"] / 60), "",
        f"    {out['command']}", "",
        f"Settings: {json.dumps(out['args'])}", "",
        f"Calibration statistics {out['statistics_seconds']:.0f} s, gradient importance "
        f"{out['gradient_seconds']:.0f} s (once, shared by the rows). Dense row: {dense['params']:,} parameters.", "",
    ]
    return "\n".join(head + lines) + "\n"


if __name__ == "__main__":
    main()
