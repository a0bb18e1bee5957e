"""Compressing the tiny VGGT testbed: every method at two ratios, the best + U/V LoRA, and the 1B costs.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vggt_table.py --out docs/results/vggt_table.md

Protocol.  The committed testbed (``VGGTSpec(weights="testbed")``), its default targets (every
Linear of the DINOv2 blocks, the frame / global blocks and the camera trunk; VGGT's fused ``qkv``
is one ``3C x C`` matrix, so factoring it *is* the joint-QKV factorization), calibration
statistics from ``--calib-scenes`` scenes of the calibration split (computed once, shared by
every row), scores on ``--scenes`` held-out test scenes (8 views, 56x56).  ``ratio`` is the
fraction of the targeted parameters removed, the same budget for every row:

- vanilla SVD, ASVD (abs-mean, α 0.5), SVD-LLM (Cholesky whitening): uniform ratio per layer;
- SVD-LLM V2: eigen-whitening + the per-type heterogeneous ``v2`` allocation;
- joint-QKV QSVD: whitening (SVD-LLM) + QSVD's gradient-based cross-layer allocation (the
  importance ``(σ_i u_iᵀ G v_i)²`` of every singular triplet of every targeted matrix from the
  multi-task loss, averaged over calibration samples, then ranked under one parameter budget);
- QSVD, FLOPs budget: the same with each component's cost weighted by the tokens through its
  layer (``compression.allocation``), so ``ratio`` is the fraction of the targeted FLOPs removed;
- best + U/V LoRA: the compressed row with the lowest multi-task loss on the validation split,
  recovered with ``callbacks.UVLoRA`` (V side first, then U) on training scenes via Lightning.

Layers whose allocated rank is not below the break-even ``m n / (m + n)`` stay dense (factoring
them would cost more than the dense layer).  Columns: GFLOPs of one forward (1 and 8 frames,
``metrics.flops``), parameters, camera AUC@30 (all frame pairs), depth AbsRel (median-aligned),
point Chamfer (Sim(3)-aligned), two-view AUC@10 (the model run on frame pairs (0,1), (2,3), ...
of each test scene; relative pose from its camera head, exact recall-curve AUC; @30 as well, since a
model trained on 8 views is far less accurate on 2), CPU latency
(median of ``--latency-runs`` forwards, 8 frames, batch 1, ``--threads`` threads), and the
fidelity to the dense model: ``‖f(x) - f_dense(x)‖ / ‖f_dense(x)‖`` over the test scenes for the
pose encoding and the depth map (the task metrics of this small testbed move little under
compression, the output error separates the methods; see the analysis in the results file).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.vggt_costs import big_model_rows, big_table, group_costs, group_table, model_cost  # noqa: E402
from compression import Recipe, collect_stats, compress_, gradient_importance, split_batch  # noqa: E402
from compression.allocation import token_cost_weights  # noqa: E402
from data.multiview.datamodule import MultiViewDataModule  # noqa: E402
from lightning_modules.vggt_spec import TESTBED_CONFIG, VGGTSpec  # noqa: E402
from metrics.camera import relative_pose_errors  # noqa: E402
from metrics.matching import pose_auc  # noqa: E402
from models.vggt import VGGT, pose_encoding_to_extri_intri  # noqa: E402

log = logging.getLogger("vggt_table")
ROWS = [  # label, method, allocation
    ("vanilla SVD", "svd", "uniform"),
    ("ASVD", "asvd", "uniform"),
    ("SVD-LLM", "svd_llm", "uniform"),
    ("SVD-LLM V2", "svd_llm_v2", "v2"),
    ("joint-QKV QSVD", "svd_llm", "gradient"),
    ("QSVD, FLOPs budget", "svd_llm", "gradient-flops"),
]
METRICS = [("camera_auc30", "AUC@30 ↑", "{:.1f}"), ("depth_abs_rel", "AbsRel ↓", "{:.3f}"),
           ("points_chamfer", "Chamfer ↓", "{:.3f}"), ("two_view_auc10", "2-view AUC@10 ↑", "{:.1f}")]
ANALYSIS = "## Why this ordering"


def stamp(msg: str) -> None:
    log.info("[%s] %s", time.strftime("%H:%M:%S"), msg)


# ----------------------------------------------------------------------------- scoring
FIDELITY = ("pose_enc", "depth", "world_points")  # outputs compared with the dense model's


@torch.no_grad()
def reference_outputs(model, spec: VGGTSpec, batches: list[dict]) -> list[dict[str, torch.Tensor]]:
    """The dense model's :data:`FIDELITY` outputs on every test batch."""
    model.eval()
    return [{k: v for k, v in model(spec.images(b)).items() if k in FIDELITY} for b in batches]


def relative_errors(pairs: list[tuple[dict, dict]]) -> dict[str, float]:
    """``‖f(x) - f_dense(x)‖ / ‖f_dense(x)‖`` over all ``(prediction, dense reference)`` pairs, per
    :data:`FIDELITY` output (fidelity to the dense model)."""
    out = {}
    for k in FIDELITY:
        num = sum(float((pred[k].double() - ref[k].double()).square().sum()) for pred, ref in pairs)
        den = sum(float(ref[k].double().square().sum()) for _, ref in pairs)
        out[f"err_{k}"] = (num / den) ** 0.5
    return out


@torch.no_grad()
def score(model, spec: VGGTSpec, test_batches: list[dict], val_batches: list[dict],
          refs: list[dict] | None = None) -> dict[str, float]:
    """Held-out metrics, two-view AUCs, output errors against ``refs`` (the dense outputs) and the
    validation loss (used only to pick the LoRA row); one forward per test batch serves the
    metrics and the output errors."""
    model.eval()
    metrics = spec.make_metrics()
    errors, pairs = [], []
    for i, batch in enumerate(test_batches):
        predictions = model(spec.images(batch))
        spec.update_metrics(metrics, predictions, batch)
        if refs is not None:
            pairs.append(({k: predictions[k] for k in FIDELITY}, refs[i]))
        errors.append(two_view_errors(model, spec, batch))
    out = {k: float(v) for k, v in spec.compute_metrics(metrics).items()}
    if refs is not None:
        out.update(relative_errors(pairs))
    auc10, auc30 = pose_auc(torch.cat(errors), [10.0, 30.0])
    out["two_view_auc10"], out["two_view_auc30"] = float(auc10), float(auc30)
    val = [float(spec.loss_terms(model(spec.images(b)), b)["total"]) for b in val_batches]
    out["val_loss"] = sum(val) / len(val)
    return out


def two_view_errors(model, spec: VGGTSpec, batch: dict) -> torch.Tensor:
    """``max(e_R, e_t)`` (degrees, translation sign folded) of frame pairs (0,1), (2,3), ... run as 2-view inputs."""
    images, gt = spec.images(batch), batch["extrinsics"].double()
    H, W = images.shape[-2:]
    errs = []
    for i in range(0, images.shape[1] - 1, 2):
        pred = model(images[:, i:i + 2])["pose_enc"].float()
        ext, _ = pose_encoding_to_extri_intri(pred, (H, W), build_intrinsics=False)
        rot, trans = relative_pose_errors(ext.double(), gt[:, i:i + 2])
        errs.append(torch.maximum(rot, trans).flatten())
    return torch.cat(errs)


@torch.no_grad()
def cpu_latency_ms(model, image_hw: tuple[int, int], frames: int = 8, runs: int = 20) -> float:
    model.eval()
    images = torch.rand(1, frames, 3, *image_hw, generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(images)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(images)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def group_kept(report, spec: VGGTSpec, dense_layers: dict[str, int]) -> dict[str, float]:
    """Fraction of each group's targeted parameters kept (dense-kept layers count fully)."""
    before: dict[str, int] = {}
    after: dict[str, int] = {}
    for r in report.layers:
        g = spec.target_group(r.name)
        before[g] = before.get(g, 0) + r.params_before
        after[g] = after.get(g, 0) + r.params_after
    for name, params in dense_layers.items():
        g = spec.target_group(name)
        before[g] = before.get(g, 0) + params
        after[g] = after.get(g, 0) + params
    return {g: round(after[g] / before[g], 4) for g in before}


def removed(report, dense_layers: dict[str, int], weights: dict[str, float] | None = None) -> float:
    """Fraction of the targeted parameters (or, with per-layer token ``weights``, Linear FLOPs) removed."""
    w = weights or {}
    before = sum(w.get(r.name, 1.0) * r.params_before for r in report.layers)
    after = sum(w.get(r.name, 1.0) * r.params_after for r in report.layers)
    kept = sum(w.get(n, 1.0) * p for n, p in dense_layers.items())
    return round(1.0 - (after + kept) / (before + kept), 4)


# ----------------------------------------------------------------------------- compression
def recipe_of(method: str, allocation: str, ratio: float, names: list[str]) -> Recipe:
    """The row's recipe: ``gradient`` rows keep a matrix dense when its rank reaches its break-even
    (factoring it would cost more than the dense layer); ``gradient-flops`` counts FLOPs, not parameters."""
    if allocation.startswith("gradient"):
        return Recipe(method, ratio=ratio, targets=names, allocation="gradient", dense_above_break_even=True,
                      budget="flops" if allocation == "gradient-flops" else "params")
    return Recipe(method, ratio=ratio, targets=names, allocation=allocation)


def compress_row(dense, recipe: Recipe, stats, importance):
    """A compressed copy of ``dense``; returns ``(model, report, dense_layers)`` (name -> params of the
    targeted layers the allocation kept dense)."""
    import copy

    model = copy.deepcopy(dense)
    report = compress_(model, recipe, stats, importances=importance)
    dense_layers = {n: sum(p.numel() for p in model.get_submodule(n).parameters()) for n in report.kept_dense}
    return model.eval(), report, dense_layers


def lora_recover(args, method: str, ratio: float, report, dense_layers: dict, image_hw) -> tuple:
    """Compress the testbed again inside a Lightning fit with the row's ranks, then run both UVLoRA stages."""
    from lightning.pytorch import Trainer

    from lightning_modules import CompressionModule

    dm = MultiViewDataModule(num_views=8, image_size=image_hw, train_scenes=args.lora_scenes, val_scenes=0,
                             test_scenes=0, calibration_scenes=args.calib_scenes, seed=0, batch_size=args.lora_batch)
    overrides = {r.name: {"rank": r.rank} for r in report.layers}
    recipe = Recipe(method, ratio=ratio, overrides=overrides, exclude=list(dense_layers),
                    calibration={"progress": False},
                    lora={"steps": [args.lora_steps, args.lora_steps], "r": args.lora_r, "alpha": 2.0 * args.lora_r,
                          "dropout": 0.0, "learning_rate": args.lora_lr})
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1000, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0)
    module = CompressionModule(VGGTSpec(weights="testbed", count_flops=False), compression=recipe,
                               learning_rate=args.lora_lr)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    plan_ranks = {n: s["rank"] for n, s in module.plan["layers"].items()}
    if plan_ranks != {r.name: r.rank for r in report.layers}:
        raise RuntimeError("the Lightning run compressed to other ranks than the table row")
    return module.model.eval(), time.perf_counter() - t0, trainer.global_step


# ----------------------------------------------------------------------------- main
def run(args: argparse.Namespace) -> dict:
    t_start = time.perf_counter()
    info = json.loads(TESTBED_CONFIG.read_text())
    image_hw = tuple(info["image_size"])
    spec = VGGTSpec(weights="testbed", count_flops=False)
    dense = spec.build().eval()
    names = spec.default_targets(dense)
    dm = MultiViewDataModule(num_views=info["num_views"], image_size=image_hw, train_scenes=0, val_scenes=8,
                             test_scenes=args.scenes, calibration_scenes=args.calib_scenes, seed=0, batch_size=4)
    test_batches, val_batches = list(dm.test_dataloader()), list(dm.val_dataloader())
    calib = list(dm.calibration_dataloader())
    rows = []
    refs = reference_outputs(dense, spec, test_batches)

    def record(label, model, ratio, extra=None):
        t0 = time.perf_counter()
        row = {"row": label, "ratio": ratio, **model_cost(model, image_hw),
               **score(model, spec, test_batches, val_batches, refs)}
        row["latency_ms"] = cpu_latency_ms(model, image_hw, runs=args.latency_runs)
        row.update(extra or {})
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        stamp(f"{label} @ {ratio}: " + ", ".join(f"{k} {row[k]:.3f}" for k, _, _ in METRICS))

    record("VGGT (dense)", dense, 0.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = collect_stats(dense, names, calib, forward=spec.calibration_forward)
    calib_s = time.perf_counter() - t0
    weights = token_cost_weights(stats, names)
    samples = [s for b in calib for s in split_batch(b)][: args.grad_samples]
    t0 = time.perf_counter()  # the importance depends on the dense model only: once for every ratio
    importance = gradient_importance(dense, names, samples, spec.training_loss, "svd_llm", stats)
    stamp(f"gradient importance {time.perf_counter() - t0:.0f} s")
    lora_rows = {}
    for ratio in args.ratios:
        candidates = []
        for label, method, allocation in ROWS:
            model, report, kept = compress_row(dense, recipe_of(method, allocation, ratio, names), stats, importance)
            extra = {"method": method, "allocation": allocation, "dense_kept": len(kept),
                     "targeted_params_removed": removed(report, kept),
                     "targeted_flops_removed": removed(report, kept, weights),
                     "group_kept": group_kept(report, spec, kept)}
            record(label, model, ratio, extra)
            candidates.append((rows[-1]["val_loss"], label, method, report, kept))
            del model
        _, label, method, report, kept = min(candidates, key=lambda c: c[0])
        model, seconds, steps = lora_recover(args, method, ratio, report, kept, image_hw)
        record(f"{label} + U/V LoRA", model, ratio, {"lora_seconds": round(seconds, 1), "lora_steps": steps,
                                                       "method": method, "base_row": label})
        lora_rows[ratio] = label
        del model
    with torch.device("meta"):
        big = VGGT(enable_track=False)
    out = {
        "args": {k: v for k, v in vars(args).items() if k != "out"}, "rows": rows, "lora_base": lora_rows,
        "calibration_seconds": round(calib_s, 1), "testbed_groups": group_costs(dense, image_hw),
        "big_groups": group_costs(big, (518, 518)), "big_rows": big_model_rows([0.0, *args.ratios]),
    }
    out["total_seconds"] = round(time.perf_counter() - t_start)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--scenes", type=int, default=32, help="held-out test scenes")
    p.add_argument("--calib-scenes", type=int, default=32, help="calibration scenes (statistics and gradients)")
    p.add_argument("--grad-samples", type=int, default=32, help="calibration samples (batch 1) for the importance")
    p.add_argument("--lora-steps", type=int, default=150, help="optimizer steps per UVLoRA stage")
    p.add_argument("--lora-scenes", type=int, default=600, help="training scenes for UVLoRA")
    p.add_argument("--lora-batch", type=int, default=2)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--latency-runs", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/vggt_table.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("compression", "callbacks", "lightning", "lightning.pytorch", "models", "lightning_modules"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    out = run(args)
    from benchmarks.vggt_table_report import plot, write_markdown

    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))
    plot(out, args.out.with_suffix(".png"))
    write_markdown(out, args.out, group_table, big_table)
    stamp(f"wrote {args.out} (+ .json, .png) in {out['total_seconds']} s")


if __name__ == "__main__":
    main()
