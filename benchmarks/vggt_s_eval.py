"""Score VGGT-S (or any VGGT) and trivial baselines on held-out synthetic scenes and the real sets.

    python benchmarks/vggt_s_eval.py --ckpt outputs/vggt/train_small/version_0/compressed.ckpt \
        --out docs/results/vggt_s_eval.json

Sets (``data.multiview.visp`` / ``data.multiview.pairs``; ``python -m data.multiview.assets fetch``
downloads them without root):

=============  =====================================  ==============================================
set            input                                   scored
=============  =====================================  ==============================================
synthetic      test split, 8 views, 112x112            camera AUC@30, depth AbsRel / δ<1.25, Chamfer
castle_simu    5 clips of 8 rendered frames, 112x154   camera AUC@30 (28 pairs a clip), depth
castel         8 clips of 4 real SR300 frames          depth (no poses)
motorcycle     the Middlebury pair, 112x168            depth (left view), 2-view pose, matching EPE
graf           graf1 -> graf3, 112x140                 matching EPE against the homography
=============  =====================================  ==============================================

Trivial baselines, through the same metric code: identity pose for every view; a constant depth
(any constant: depth is median-aligned per image); identity matches (``m(q) = q``).  The model
matches through its point maps (:mod:`metrics.correspondence`); the track head is scored only when
the model has a trained one (``--track``), which the CPU run does not.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from data.multiview.pairs import GrafPair, MotorcyclePair  # noqa: E402
from data.multiview.synthetic import SyntheticMultiViewDataset  # noqa: E402
from data.multiview.visp import CastelDataset, CastleSimuDataset  # noqa: E402
from lightning_modules.vggt_spec import VGGTSpec, baseline_predictions, valid_pixels  # noqa: E402
from metrics.camera import CameraPoseMetric  # noqa: E402
from metrics.correspondence import MatchingEPE, pointmap_matches  # noqa: E402
from metrics.depth import DepthMetric  # noqa: E402
from metrics.pointmap import PointMapMetric  # noqa: E402
from models.vggt import pose_encoding_to_extri_intri  # noqa: E402

log = logging.getLogger("vggt_s_eval")
SETS = ("synthetic", "castle_simu", "castel", "motorcycle", "graf")
Predict = Callable[[dict], dict]


def build_sets(names: tuple[str, ...] = SETS, synthetic_scenes: int = 16, seed: int = 0) -> dict:
    """The evaluation datasets by name (each item one sample; see the module docstring)."""
    make = {
        "synthetic": lambda: SyntheticMultiViewDataset(synthetic_scenes, num_views=8, image_size=(112, 112),
                                                       seed=seed, split_id=2),
        "castle_simu": lambda: CastleSimuDataset(num_views=8, image_size=(112, 154), stride=5),
        "castel": lambda: CastelDataset(num_views=4, image_size=(112, 154), stride=3, num_samples=8),
        "motorcycle": lambda: MotorcyclePair(image_size=(112, 168)),
        "graf": lambda: GrafPair(image_size=(112, 140)),
    }
    unknown = [n for n in names if n not in make]
    if unknown:
        raise ValueError(f"unknown sets {unknown}; choose from {list(make)}")
    return {name: make[name]() for name in names}


def batched(sample: dict) -> dict:
    """A dataset item as a batch of one (tensors get a leading 1, strings a list)."""
    return {k: (v[None] if torch.is_tensor(v) else [v]) for k, v in sample.items()}


def model_predictor(model: nn.Module, spec: VGGTSpec, track: bool = False) -> Predict:
    """Predictions of ``model`` for a batch; with ``track`` the track head answers the batch's query points."""

    @torch.no_grad()
    def predict(batch: dict) -> dict:
        queries = batch.get("query_points") if track else None
        out = model(spec.images(batch), query_points=queries)
        if "query_points" in batch:
            if track:
                out["matches"] = out["track"][0, 1]
            else:
                out["matches"] = pointmap_matches(out["world_points"][0, 0], out["world_points"][0, 1],
                                                  batch["query_points"][0])
        return out

    return predict


def baseline_predictor(batch: dict) -> dict:
    """Identity poses, constant depth, identity matches (module docstring)."""
    if valid_pixels(batch).any():
        out = baseline_predictions(batch)
    else:  # graf: no depth at all; constant depth 1 and identity poses
        fake = dict(batch, depths=torch.ones_like(batch["depths"]), masks=torch.ones_like(batch["masks"]))
        out = baseline_predictions(fake)
    if "query_points" in batch:
        out["matches"] = batch["query_points"][0].clone()
    return out


def score_set(predict: Predict, dataset, name: str) -> dict[str, float]:
    """Run ``predict`` on every sample of one set and return its metrics (module docstring)."""
    camera, depth = CameraPoseMetric(max_threshold=30, accuracy_threshold=30.0), DepthMetric(align="median")
    points, matching = PointMapMetric(align="sim3", max_points=4096), MatchingEPE()
    used = set()
    for i in range(len(dataset)):
        batch = batched(dataset[i])
        pred = predict(batch)
        has_poses = bool(batch.get("has_poses", torch.tensor([True]))[0])
        valid = valid_pixels(batch)
        H, W = batch["images"].shape[-2:]
        if has_poses:
            ext, _ = pose_encoding_to_extri_intri(pred["pose_enc"].float(), (H, W), build_intrinsics=False)
            camera.update(ext, batch["extrinsics"])
            used.add("camera")
        if valid.any():
            depth.update(pred["depth"].float(), batch["depths"], valid)
            used.add("depth")
        if has_poses and name != "motorcycle" and valid.any():
            points.update(pred["world_points"].float(), batch["world_points"], valid)
            used.add("points")
        if "matches" in pred:
            matching.update(pred["matches"], batch["target_points"][0])
            used.add("matching")
    out: dict[str, float] = {}
    if "camera" in used:
        cam = camera.compute()
        out.update(camera_auc30=cam["auc@30"], camera_rra30=cam["rra@30"], camera_rta30=cam["rta@30"])
    if "depth" in used:
        d = depth.compute()
        out.update(depth_abs_rel=d["abs_rel"], **{"depth_delta1.25": d["delta_1.25"]})
    if "points" in used:
        out["points_chamfer"] = points.compute()["chamfer"]
    if "matching" in used:
        m = matching.compute()
        out.update(match_epe=m["epe"], match_epe_median=m["epe_median"], **{"match_pck@3": m["pck@3"]})
    return {k: float(v) for k, v in out.items()}


def score_all(predict: Predict, sets: dict) -> dict[str, dict[str, float]]:
    """``{set: metrics}`` for every set."""
    results = {}
    for name, dataset in sets.items():
        t0 = time.perf_counter()
        results[name] = score_set(predict, dataset, name)
        log.info("%s (%.0f s): %s", name, time.perf_counter() - t0,
                 ", ".join(f"{k} {v:.3f}" for k, v in results[name].items()))
    return results


def load_from_checkpoint(ckpt: Path) -> tuple[nn.Module, VGGTSpec]:
    """Rebuild the model of a ``train.py`` run from its saved ``config.yaml`` and load the checkpoint strictly."""
    import yaml

    from compression.io import safe_torch_load
    from models.vggt import VGGT

    config_path = ckpt.parent / "config.yaml"
    if not config_path.is_file():
        raise FileNotFoundError(f"{config_path} not found: the checkpoint's run config is needed to rebuild the model")
    init = dict(yaml.safe_load(config_path.read_text())["model"]["spec"]["init_args"])
    init.update(backbone_weights=None, weights=None, count_flops=False)  # the checkpoint holds every weight
    spec = VGGTSpec(**init)
    model = VGGT(spec.model_config(), enable_track=spec.enable_track)
    state = safe_torch_load(ckpt)
    model.load_state_dict({k.removeprefix("model."): v for k, v in state["state_dict"].items()
                           if k.startswith("model.")}, strict=True)
    return model.eval(), spec


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", type=Path, help="a train.py checkpoint (compressed.ckpt) with its config.yaml")
    src.add_argument("--weights", help="a VGGT .safetensors (official names) with its .json side file")
    src.add_argument("--untrained", action="store_true", help="VGGT-S with the DINOv2-S backbone, rest random")
    p.add_argument("--sets", nargs="+", default=list(SETS), choices=SETS)
    p.add_argument("--synthetic-scenes", type=int, default=16)
    p.add_argument("--track", action="store_true", help="match with the track head instead of the point maps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, required=True, help="JSON file for {model, baseline} x set x metric")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    if args.ckpt is not None:
        model, spec = load_from_checkpoint(args.ckpt)
    elif args.weights is not None:
        spec = VGGTSpec(config="small", weights=args.weights, enable_track=args.track, count_flops=False)
        model = spec.build().eval()
    else:
        spec = VGGTSpec(config="small", backbone_weights="dinov2-s", count_flops=False)
        model = spec.build().eval()
    sets = build_sets(tuple(args.sets), args.synthetic_scenes)
    out = {"args": {k: str(v) for k, v in vars(args).items()},
           "model": score_all(model_predictor(model, spec, args.track), sets),
           "baseline": score_all(baseline_predictor, sets)}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    log.info("wrote %s in %.0f s", args.out, out["seconds"])


if __name__ == "__main__":
    main()
