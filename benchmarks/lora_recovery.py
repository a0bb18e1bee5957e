"""How much alternating U/V LoRA recovers after SVD-LLM whitening, on SmolLM2-135M (offline, CPU-sized).

For each ratio: calibrate (Shakespeare comedies + Wikipedia), compress with ``svd_llm``, then
run :class:`callbacks.UVLoRA` (stage 1 on the ``down``/V factors, merge, stage 2 on the
``up``/U factors, merge) finetuning on Shakespeare histories.  Perplexity is measured on the
held-out test corpora of ``TextDataModule`` (tragedies@test, wiki:test -- neither used for
calibration or finetuning) after whitening only, after stage 1, and after stage 2::

    python benchmarks/lora_recovery.py --ratios 0.2 0.4 --steps 30 30 --out docs/results/lora_recovery.md

The defaults fit about 15 minutes on 2 CPU cores (short sequences, few steps); on a GPU use
``configs/llm/lora.yaml`` for the full recipe.
"""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Callback, Trainer, seed_everything  # noqa: E402

from callbacks import UVLoRA  # noqa: E402
from compression import Recipe  # noqa: E402
from data.text import TextDataModule  # noqa: E402
from lightning_modules import CausalLMSpec, CompressionModule  # noqa: E402

log = logging.getLogger("lora_recovery")


class StageScores(Callback):
    """Test perplexities when training starts (whitening only) and when stage 1 has been merged."""

    def __init__(self, lora: UVLoRA) -> None:
        self.lora = lora
        self.scores: dict[str, dict[str, float]] = {}
        self.seconds: dict[str, float] = {}
        self._t0 = 0.0

    def _score(self, trainer: Trainer, pl_module: CompressionModule, key: str) -> None:
        dm = trainer.datamodule
        start = time.perf_counter()
        self.scores[key] = {name: pl_module.evaluate_loader(loader)["ppl"]
                            for name, loader in zip(dm.test_names, dm.test_dataloader())}
        log.info("%s: %s (%.0f s)", key, self.scores[key], time.perf_counter() - start)

    def on_train_start(self, trainer, pl_module) -> None:
        self._score(trainer, pl_module, "whitening")
        self._t0 = time.perf_counter()

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        # at the first step of stage 2 (UVLoRA merges the stage-1 adapters after this hook: same function)
        if "stage1" not in self.scores and trainer.global_step == self.lora.boundaries[0]:
            self.seconds["stage1_train"] = time.perf_counter() - self._t0
            self._score(trainer, pl_module, "stage1")
            self._t0 = time.perf_counter()

    def on_train_end(self, trainer, pl_module) -> None:
        self.seconds["stage2_train"] = time.perf_counter() - self._t0


def run_ratio(ratio: float, args: argparse.Namespace, dm: TextDataModule, evaluate_dense: bool) -> dict:
    seed_everything(args.seed)
    recipe = Recipe("svd_llm", ratio=ratio, calibration={"progress": False},
                    lora={"order": args.order, "steps": args.steps, "r": args.r, "alpha": args.alpha, "dropout": 0.0,
                          "learning_rate": args.lr})
    module = CompressionModule(CausalLMSpec("smollm2-135m"), compression=recipe, evaluate_dense=evaluate_dense,
                               learning_rate=args.lr)
    scores = StageScores(module.stage_callbacks()[-1])
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=-1, max_epochs=-1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, deterministic=True, callbacks=[scores])
    start = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    scores._score(trainer, module, "stage2")
    summary = module.report.summary()
    return {
        "ratio": ratio,
        "params_removed_targeted": summary["params_ratio"],
        "params_removed_model": summary["model_params_ratio"],
        "dense": module.dense_metrics,
        "ppl": scores.scores,
        "calibration_seconds": module.calibration_seconds,
        "train_seconds": scores.seconds,
        "wall_seconds": time.perf_counter() - start,
    }


def markdown(results: list[dict], args: argparse.Namespace, command: str) -> str:
    names = list(results[0]["ppl"]["whitening"])
    dense = next((r["dense"] for r in results if r["dense"]), {})
    lines = [
        "# LoRA recovery after SVD-LLM whitening (SmolLM2-135M, CPU)",
        "",
        f"Command: `{command}`",
        "",
        f"Calibration: {args.calibration_samples} x {args.seq_len}-token windows of Shakespeare comedies + "
        f"Wikipedia summaries. Finetuning: Shakespeare histories, {args.steps[0]} + {args.steps[1]} optimizer steps "
        f"of {args.batch_size} x {args.seq_len} tokens (stage order {args.order[0]} then {args.order[1]}), LoRA "
        f"r={args.r}, alpha={args.alpha:g}, lr={args.lr:g}, AdamW. Test: {args.eval_tokens} tokens per corpus "
        "(evenly spaced windows) of held-out tragedies (`shakespeare:tragedies@test`) and Wikipedia "
        "(`wiki:test`); neither is used for calibration or finetuning. Perplexity, lower is better.",
        "",
        "| ratio | removed (targeted / model) | corpus | dense | whitening only | + stage 1 (" + args.order[0]
        + ") | + stage 2 (" + args.order[1] + ") |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        for name in names:
            d = dense.get(name, {}).get("ppl")
            p = r["ppl"]
            lines.append(
                f"| {r['ratio']:g} | {r['params_removed_targeted']:.3f} / {r['params_removed_model']:.3f} | {name} | "
                f"{d:.2f} | {p['whitening'][name]:.2f} | {p['stage1'][name]:.2f} | {p['stage2'][name]:.2f} |"
                if d is not None else
                f"| {r['ratio']:g} | ... | {name} | - | {p['whitening'][name]:.2f} | {p['stage1'][name]:.2f} | "
                f"{p['stage2'][name]:.2f} |"
            )
    lines += ["", "| ratio | calibration s | stage 1 train s | stage 2 train s | whole run s |",
              "|---|---|---|---|---|"]
    for r in results:
        s = r["train_seconds"]
        lines.append(f"| {r['ratio']:g} | {r['calibration_seconds']:.0f} | {s.get('stage1_train', 0):.0f} | "
                     f"{s.get('stage2_train', 0):.0f} | {r['wall_seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4])
    parser.add_argument("--steps", type=int, nargs=2, default=[30, 30], help="optimizer steps of stage 1 and 2")
    parser.add_argument("--order", nargs=2, default=["down", "up"])
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--calibration-samples", type=int, default=32)
    parser.add_argument("--eval-tokens", type=int, default=4096, help="test tokens per corpus")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (more than 1 slows down badly on shared cores)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="markdown table (and a .json beside it)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    dm = TextDataModule(tokenizer="smollm2-135m", seq_len=args.seq_len, calibration_samples=args.calibration_samples,
                        finetune_samples=sum(args.steps) * args.batch_size, eval_max_tokens=args.eval_tokens,
                        batch_size=args.batch_size, seed=args.seed)
    results = [run_ratio(ratio, args, dm, evaluate_dense=(i == 0)) for i, ratio in enumerate(args.ratios)]
    command = "python benchmarks/lora_recovery.py " + " ".join(sys.argv[1:] if argv is None else argv)
    table = markdown(results, args, command)
    print(table)
    if args.out is not None:
        from common import write_keeping_notes  # here, not at the top: its OpenMP default is not this run's

        write_keeping_notes(args.out, table)  # the notes under the tables survive a rerun
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
