"""Compressing VGGT-S: every method x ratio, scored on held-out synthetic scenes and the real sets.

    flock /tmp/svd-vggt-heavy.lock python benchmarks/vggt_s_table.py \
        --ckpt outputs/vggt/train_small/version_0/compressed.ckpt --ratios 0.4 --out docs/results/vggt_s_table.md

Protocol.  The dense model: a ``train.py`` checkpoint of ``configs/vggt/train_small.yaml`` (``--ckpt``)
or a VGGT-S ``.safetensors`` (``--weights``).  Targets: ``VGGTSpec``'s default groups (the 12 DINOv2-S
blocks, the 8 frame + 8 global blocks, the camera trunk; fused ``qkv`` = joint QKV).  One set of
calibration statistics (``--calib-scenes`` synthetic scenes of the calibration split, 8 views at 112 px)
serves every row; the gradient rows also use the multi-task-loss importance of ``--grad-samples`` of them.
Rows are those of ``benchmarks/vggt_table.py`` (vanilla SVD, ASVD, SVD-LLM, SVD-LLM V2, joint-QKV QSVD
with gradient allocation, the same under a FLOPs budget), at each ``--ratios`` (fraction of the targeted
parameters removed).  Each row is scored by ``benchmarks/vggt_s_eval.py`` on every set (synthetic test
split, Castle-simu, castel, the Middlebury motorcycle, graf), its GFLOPs counted on the factored model
(8 views at 112x112, ``metrics.flops``), and its outputs compared with the dense model's
(``‖f - f_dense‖ / ‖f_dense‖`` of the depth maps and pose encodings over every set).

Rows are appended to ``<out>.json`` as they finish (a run can be split: ``--rows svd svd_llm``), and
the markdown is rewritten from the JSON after each row.  Order: the ``--extra-rows`` at every ratio
(0.4 first), then the other rows, so a run cut short still compares vanilla SVD and SVD-LLM across ratios;
the gradient importance is computed only when the first gradient row comes up.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.vggt_costs import model_cost  # noqa: E402
from benchmarks.vggt_s_eval import (  # noqa: E402
    SETS,
    baseline_predictor,
    build_sets,
    load_from_checkpoint,
    model_predictor,
    score_all,
)
from benchmarks.vggt_table import ROWS, compress_row, group_kept, recipe_of, removed  # noqa: E402
from compression import collect_stats, gradient_importance, split_batch  # noqa: E402
from data.multiview.datamodule import MultiViewDataModule  # noqa: E402
from lightning_modules.vggt_spec import VGGTSpec  # noqa: E402

log = logging.getLogger("vggt_s_table")
ANALYSIS = "## What the numbers say"
ROW_KEYS = {"svd": 0, "asvd": 1, "svd_llm": 2, "svd_llm_v2": 3, "qsvd": 4, "qsvd_flops": 5}
COLUMNS = [  # (set, metric, header, format)
    ("synthetic", "camera_auc30", "syn AUC@30 ↑", "{:.1f}"),
    ("synthetic", "depth_abs_rel", "syn AbsRel ↓", "{:.3f}"),
    ("synthetic", "points_chamfer", "syn Chamfer ↓", "{:.3f}"),
    ("castle_simu", "camera_auc30", "Castle AUC@30 ↑", "{:.1f}"),
    ("castle_simu", "depth_abs_rel", "Castle AbsRel ↓", "{:.3f}"),
    ("castel", "depth_abs_rel", "castel AbsRel ↓", "{:.3f}"),
    ("castel", "depth_delta1.25", "castel δ<1.25 ↑", "{:.3f}"),
    ("motorcycle", "depth_abs_rel", "moto AbsRel ↓", "{:.3f}"),
    ("motorcycle", "match_epe", "moto EPE px ↓", "{:.1f}"),
    ("graf", "match_epe", "graf EPE px ↓", "{:.1f}"),
]


class Recorder:
    """Wraps a predictor; keeps the depth and pose encodings of every sample, in order, for fidelity."""

    def __init__(self, predict) -> None:
        self.predict, self.outputs = predict, []

    def __call__(self, batch: dict) -> dict:
        out = self.predict(batch)
        self.outputs.append({k: out[k].detach().double() for k in ("depth", "pose_enc")})
        return out


def fidelity(outputs: list[dict], reference: list[dict]) -> dict[str, float]:
    """``‖f - f_dense‖ / ‖f_dense‖`` per output over all samples of all sets."""
    res = {}
    for k in ("depth", "pose_enc"):
        num = sum(float((a[k] - b[k]).square().sum()) for a, b in zip(outputs, reference))
        den = sum(float(b[k].square().sum()) for b in reference)
        res[f"err_{k}"] = (num / den) ** 0.5
    return res


def write_markdown(data: dict, path: Path) -> None:
    rows = data["rows"]
    lines = ["# VGGT-S compression table", "", "Produced by (rows appended per run; every row's command is in the JSON "
             "next to this file):", "", "```bash"]
    lines += [f"flock /tmp/svd-vggt-heavy.lock {c}" for c in data["commands"]] + ["```", "",
             "ratio = fraction of the targeted parameters removed (DINOv2-S blocks, frame / global blocks, camera "
             "trunk). GFLOPs: one 8-view 112x112 forward of the model as evaluated. err = relative L2 distance of "
             "the depth maps / pose encodings to the dense model's over every set. Sets and baselines: "
             "`benchmarks/vggt_s_eval.py`.", ""]
    header = ["row", "ratio", "GFLOPs (8 views)", "params M", "removed"] + [c[2] for c in COLUMNS] + [
        "err depth", "err pose"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in sorted(rows, key=lambda r: (r["ratio"], r.get("order", -1))):
        cells = [r["row"], f"{r['ratio']:.1f}", f"{r['gflops_8']:.1f}" if "gflops_8" in r else "-",
                 f"{r['params'] / 1e6:.1f}" if "params" in r else "-",
                 f"{r['targeted_params_removed']:.3f}" if "targeted_params_removed" in r else "-"]
        for set_name, key, _, fmt in COLUMNS:
            v = r["scores"].get(set_name, {}).get(key)
            cells.append(fmt.format(v) if v is not None else "-")
        cells += [f"{r[k]:.3f}" if k in r else "-" for k in ("err_depth", "err_pose_enc")]
        lines.append("| " + " | ".join(cells) + " |")
    kept = ""
    if path.is_file() and ANALYSIS in path.read_text():  # the hand-written analysis survives regeneration
        kept = path.read_text()[path.read_text().index(ANALYSIS):]
    path.write_text("\n".join(lines) + "\n" + ("\n" + kept if kept else ""))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="train.py checkpoint of configs/vggt/train_small.yaml")
    src.add_argument("--weights", help="a VGGT-S .safetensors with its .json side file")
    p.add_argument("--ratios", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    p.add_argument("--rows", nargs="+", default=list(ROW_KEYS), choices=list(ROW_KEYS))
    p.add_argument("--extra-ratios", type=float, nargs="*", default=[],
                   help="further ratios run with --extra-rows only (a smaller grid when time is short)")
    p.add_argument("--extra-rows", nargs="*", default=["svd", "svd_llm"], choices=list(ROW_KEYS))
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--scenes", type=int, default=8, help="held-out synthetic test scenes")
    p.add_argument("--calib-scenes", type=int, default=8, help="calibration scenes (statistics)")
    p.add_argument("--grad-samples", type=int, default=4, help="calibration samples for the gradient importance")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=ROOT / "docs/results/vggt_s_table.md")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("compression", "models", "lightning_modules"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    t_start = time.perf_counter()
    if args.ckpt is not None:
        dense, spec = load_from_checkpoint(args.ckpt)
    else:
        spec = VGGTSpec(config="small", weights=args.weights, count_flops=False)
        dense = spec.build().eval()
    names = spec.default_targets(dense)
    sets = build_sets(tuple(args.sets), args.scenes)
    json_path = args.out.with_suffix(".json")
    data = json.loads(json_path.read_text()) if json_path.is_file() else {"rows": []}
    command = "python benchmarks/vggt_s_table.py " + " ".join(sys.argv[1:] if argv is None else argv)
    data["commands"] = sorted(set(data.get("commands", [])) | {command})

    def save(row: dict) -> None:
        row["command"] = command
        data["rows"] = [r for r in data["rows"] if (r["row"], r["ratio"]) != (row["row"], row["ratio"])] + [row]
        args.out.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(data, args.out)

    image_hw = (112, 112)
    t0 = time.perf_counter()
    dense_rec = Recorder(model_predictor(dense, spec))
    save({"row": "VGGT-S (dense)", "ratio": 0.0, "order": -1, **model_cost(dense, image_hw, frames=(8,)),
          "scores": score_all(dense_rec, sets), "eval_s": round(time.perf_counter() - t0, 1)})
    if not any(r["row"] == "trivial baseline" for r in data["rows"]):
        save({"row": "trivial baseline", "ratio": 0.0, "order": -2, "scores": score_all(baseline_predictor, sets)})
    log.info("dense + baseline scored in %.0f s", time.perf_counter() - t0)

    dm = MultiViewDataModule(num_views=8, image_size=image_hw, train_scenes=0, val_scenes=0, test_scenes=0,
                             calibration_scenes=args.calib_scenes, seed=0, batch_size=1)
    calib = list(dm.calibration_dataloader())
    t0 = time.perf_counter()
    with torch.no_grad():
        stats = collect_stats(dense, names, calib, forward=spec.calibration_forward)
    log.info("calibration statistics in %.0f s", time.perf_counter() - t0)
    importance = None
    grid = [(r, k) for r in args.ratios for k in args.rows]
    grid += [(r, k) for r in args.extra_ratios for k in args.extra_rows]
    from compression.allocation import token_cost_weights

    weights = token_cost_weights(stats, names)
    # the rows on every ratio first (0.4 leading), then the rest: a run cut short keeps the comparison across ratios
    order = sorted(set(grid), key=lambda rk: (rk[1] not in args.extra_rows, rk[0] != 0.4, rk[0], ROW_KEYS[rk[1]]))
    for ratio, key in order:
        label, method, allocation = ROWS[ROW_KEYS[key]]
        if allocation.startswith("gradient") and importance is None:
            t0 = time.perf_counter()
            samples = [s for b in calib for s in split_batch(b)][: args.grad_samples]
            importance = gradient_importance(dense, names, samples, spec.training_loss, "svd_llm", stats)
            log.info("gradient importance in %.0f s", time.perf_counter() - t0)
        t0 = time.perf_counter()
        model, report, kept = compress_row(dense, recipe_of(method, allocation, ratio, names), stats, importance)
        rec = Recorder(model_predictor(model, spec))
        row = {"row": label, "ratio": ratio, "order": ROW_KEYS[key], "method": method, "allocation": allocation,
               **model_cost(model, image_hw, frames=(8,)), "targeted_params_removed": removed(report, kept),
               "targeted_flops_removed": removed(report, kept, weights), "dense_kept": len(kept),
               "group_kept": group_kept(report, spec, kept), "scores": score_all(rec, sets)}
        row.update(fidelity(rec.outputs, dense_rec.outputs))
        row["seconds"] = round(time.perf_counter() - t0, 1)
        save(row)
        log.info("%s @ %.1f: %.0f s, err depth %.3f pose %.3f", label, ratio, row["seconds"], row["err_depth"],
                 row["err_pose_enc"])
        del model
    log.info("done in %.0f s", time.perf_counter() - t_start)


if __name__ == "__main__":
    main()
