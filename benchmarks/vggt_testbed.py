"""The tiny VGGT testbed: export its weights, and score it against trivial baselines.

    python benchmarks/vggt_testbed.py export --ckpt outputs/vggt/train_tiny/version_0/compressed.ckpt
    python benchmarks/vggt_testbed.py report            # writes docs/results/vggt_testbed.md

``export`` rebuilds the model from the run's saved ``config.yaml`` (LightningCLI writes it next
to the checkpoint), loads the checkpoint's weights strictly and writes
``models/vggt/weights/vggt_tiny_synthetic.safetensors`` (official parameter names, so
``load_official_state_dict`` loads it strictly) plus ``vggt_tiny_synthetic.json`` (its
``VGGTConfig`` and how it was trained).

``report`` evaluates, on held-out synthetic scenes (the DataModule's test split: seeds disjoint
from training), the trained testbed and the trivial baseline of
:func:`lightning_modules.vggt_spec.baseline_predictions` (identity pose for every frame, each
image's mean GT depth everywhere, that constant-depth plane as the point map) through the very
same metric path; then counts GFLOPs per forward (1 and 8 frames, per component, with
``metrics.flops``) and parameters of the testbed and of the 1B model (meta device).
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
sys.path.insert(0, str(ROOT))

from compression.io import safe_torch_load  # noqa: E402
from data.multiview.datamodule import MultiViewDataModule  # noqa: E402
from lightning_modules.vggt_spec import (  # noqa: E402
    TESTBED_CONFIG,
    TESTBED_WEIGHTS,
    VGGTSpec,
    baseline_predictions,
    save_vggt_weights,
)
from metrics.flops import VGGT_COMPONENTS, vggt_flops  # noqa: E402
from models.vggt import VGGT  # noqa: E402

log = logging.getLogger("vggt_testbed")
COLUMNS = [
    ("camera_auc30", "AUC@30 ↑", "{:.1f}"),
    ("camera_rra30", "RRA@30 ↑", "{:.1f}"),
    ("camera_rta30", "RTA@30 ↑", "{:.1f}"),
    ("depth_abs_rel", "depth AbsRel ↓", "{:.3f}"),
    ("depth_delta1.25", "δ<1.25 ↑", "{:.3f}"),
    ("points_chamfer", "point Chamfer ↓", "{:.3f}"),
]


def export(args: argparse.Namespace) -> None:
    import yaml

    ckpt = Path(args.ckpt)
    config_path = ckpt.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: export needs the config.yaml that train.py saved")
    run = yaml.safe_load(config_path.read_text())
    spec = VGGTSpec(**run["model"]["spec"]["init_args"])
    model = VGGT(spec.model_config(), enable_track=spec.enable_track)
    state = safe_torch_load(ckpt)  # weights_only: a checkpoint is data, never code
    weights = {k.removeprefix("model."): v for k, v in state["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(weights, strict=True)
    data = run["data"]["init_args"]
    summary = ckpt.parent / "summary.json"
    metadata = {
        "description": "tiny VGGT trained from scratch on procedural synthetic scenes (data.multiview, synthetic)",
        "input": "RGB in [0, 1], [B, S, 3, H, W]; ImageNet normalisation happens inside the model",
        "image_size": data["image_size"],
        "num_views": data["num_views"],
        "enable_track": spec.enable_track,
        "global_step": state.get("global_step"),
        "training_command": args.command,
        "training_data": {k: data[k] for k in ("source", "train_scenes", "seed", "batch_size")},
        "training_wall_seconds": json.loads(summary.read_text())["wall_seconds"] if summary.is_file() else None,
    }
    out = save_vggt_weights(model, args.out, metadata)
    if out.resolve() == TESTBED_WEIGHTS:
        VGGTSpec(weights="testbed").build()  # the committed file must load strictly
    log.info("wrote %s (%.1f MB) and %s", out, out.stat().st_size / 2**20, out.with_suffix(".json"))


@torch.no_grad()
def evaluate_rows(num_scenes: int, batch_size: int = 4) -> dict[str, dict[str, float]]:
    """``{"testbed": metrics, "baseline": metrics}`` on ``num_scenes`` held-out scenes."""
    info = json.loads(TESTBED_CONFIG.read_text())
    spec = VGGTSpec(weights="testbed")
    model = spec.build().eval()
    dm = MultiViewDataModule(num_views=info["num_views"], image_size=tuple(info["image_size"]), train_scenes=0,
                             test_scenes=num_scenes, seed=0, batch_size=batch_size)
    metrics = {"testbed": spec.make_metrics(), "baseline": spec.make_metrics()}
    for i, batch in enumerate(dm.test_dataloader()):
        spec.evaluate(model, batch, metrics["testbed"], i)
        spec.update_metrics(metrics["baseline"], baseline_predictions(batch), batch)
    return {name: {k: float(v) for k, v in spec.compute_metrics(m).items()} for name, m in metrics.items()}


def params_by_component(model: torch.nn.Module) -> dict[str, int]:
    """Parameters per ``VGGT_COMPONENTS`` entry (0 for a disabled head) and in total."""
    out = {}
    for prefix in VGGT_COMPONENTS:
        parent, _, leaf = prefix.rpartition(".")
        module = getattr(model.get_submodule(parent) if parent else model, leaf)
        out[prefix] = sum(p.numel() for p in module.parameters()) if module is not None else 0
    out["total"] = sum(p.numel() for p in model.parameters())
    return out


def flop_table(model: torch.nn.Module, image_hw: tuple[int, int]) -> list[str]:
    flops = {s: vggt_flops(model, num_frames=s, image_hw=image_hw) for s in (1, 8)}
    params = params_by_component(model)
    lines = ["| component | params | GFLOPs, 1 frame | GFLOPs, 8 frames |", "|---|---:|---:|---:|"]
    for key in (*VGGT_COMPONENTS, "total"):
        lines.append(f"| {key} | {params[key]:,} | {flops[1][key]:.4g} | {flops[8][key]:.4g} |")
    return lines


def report(args: argparse.Namespace) -> None:
    info = json.loads(TESTBED_CONFIG.read_text())
    image_hw = tuple(info["image_size"])
    start = time.perf_counter()
    rows = evaluate_rows(args.scenes)
    eval_seconds = time.perf_counter() - start
    testbed = VGGTSpec(weights="testbed").build().eval()
    with torch.device("meta"):
        big = VGGT(enable_track=False)
    cfg = info["config"]
    cmd = "python benchmarks/vggt_testbed.py report" + (f" --scenes {args.scenes}" if args.scenes != 32 else "")
    lines = [
        "# VGGT tiny testbed (synthetic scenes)",
        "",
        f"Produced by `{cmd}` ({eval_seconds:.0f} s of evaluation on CPU).",
        "",
        f"Testbed: `VGGTConfig.tiny()` widened to embed {cfg['embed_dim']} (depth {cfg['depth']}, "
        f"{cfg['num_heads']} heads, {cfg['backbone_depth']} DINOv2 blocks, {cfg['camera_trunk_depth']} camera-trunk "
        f"block, patch {cfg['patch_size']}, LayerScale init {cfg['init_values']:g}), {info['num_views']} views at "
        f"{image_hw[0]}x{image_hw[1]}, "
        f"weights `models/vggt/weights/vggt_tiny_synthetic.safetensors` (official naming, loads strictly).",
        "",
        "## Training",
        "",
        "```bash",
        "flock /tmp/svd-vggt-heavy.lock python train.py fit --config configs/vggt/train_tiny.yaml",
        "python benchmarks/vggt_testbed.py export --ckpt outputs/vggt/train_tiny/version_N/compressed.ckpt",
        "```",
        "",
        f"Recorded run: `{info.get('training_command')}`; {info.get('global_step')} optimizer steps, "
        f"{(info.get('training_wall_seconds') or float('nan')) / 60:.1f} min wall time for the whole "
        "`train.py` run on the shared 2-core CPU machine (training, validation, test).",
        "",
        f"## Quality on {args.scenes} held-out scenes",
        "",
        "Test split of `MultiViewDataModule(source='synthetic', seed=0)` (scene seeds disjoint from "
        "training). Camera metrics over all frame pairs (degrees); depth median-aligned per image; "
        "Chamfer after Umeyama Sim(3) alignment, in GT units. Same numbers as "
        "`python evaluate.py test --config configs/vggt/eval_tiny.yaml`, which prints them (`test/<metric>/test`) "
        f"with `test/gflops/test` = {rows['testbed']['gflops']:.4g}, the GFLOPs of one forward of the evaluated "
        "model on one sample (8 views, counted by `VGGTSpec.evaluate`; the per-component split is below).",
        "",
        "| model | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---:|" * len(COLUMNS),
    ]
    names = {"testbed": "trained testbed", "baseline": "mean depth + identity poses"}
    for key, label in names.items():
        lines.append(f"| {label} | " + " | ".join(f.format(rows[key][c]) for c, _, f in COLUMNS) + " |")
    ratio = rows["testbed"]["depth_abs_rel"] / rows["baseline"]["depth_abs_rel"]
    lines += [
        "",
        f"Testbed depth AbsRel = {ratio:.2f} x the mean-depth baseline's. The baseline predicts identity "
        "extrinsics for every frame (all relative translations vanish, so RTA and AUC are 0), each "
        "image's mean valid GT depth at every pixel, and that fronto-parallel plane (GT intrinsics) as "
        "the point map.",
        "",
        f"## Cost of the testbed ({image_hw[0]}x{image_hw[1]}, no track head)",
        "",
        f"`metrics.flops.vggt_flops(model, num_frames=S, image_hw={image_hw})` (FlopCounterMode; matmuls, "
        "attention and convolutions; element-wise ops not counted), from the same command.",
        "",
        *flop_table(testbed, image_hw),
        "",
        "## Cost of VGGT-1B (518x518, no track head, meta device)",
        "",
        "`vggt_flops(num_frames=S)` on `VGGT(enable_track=False)` built under `torch.device('meta')`, "
        "from the same command.",
        "",
        *flop_table(big, (518, 518)),
        "",
    ]
    Path(args.out).write_text("\n".join(lines))
    log.info("wrote %s", args.out)
    print(json.dumps(rows, indent=1))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command_name", required=True)
    p_export = sub.add_parser("export", help="Lightning checkpoint of train_tiny.yaml -> safetensors + JSON")
    p_export.add_argument("--ckpt", required=True, help="compressed.ckpt written by train.py (config.yaml beside it)")
    p_export.add_argument("--out", default=str(TESTBED_WEIGHTS), help="output .safetensors path")
    p_export.add_argument("--command", default="python train.py fit --config configs/vggt/train_tiny.yaml",
                          help="training command recorded in the JSON")
    p_report = sub.add_parser("report", help="testbed vs baselines, GFLOPs -> markdown")
    p_report.add_argument("--scenes", type=int, default=32, help="held-out scenes to evaluate")
    p_report.add_argument("--out", default=str(ROOT / "docs/results/vggt_testbed.md"), help="markdown output")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    if args.command_name == "export":
        export(args)
    else:
        report(args)


if __name__ == "__main__":
    main()
