"""State-dict conversion: official VGGT checkpoints and timm DINOv2 backbones.

* ``load_official_state_dict(model, sd)``: load a state dict in the official naming
  (facebook/VGGT-1B) into :class:`~models.vggt.model.VGGT`.  Keys of heads that the model
  was built without (e.g. ``track_head.*`` with ``enable_track=False``) are skipped; any
  other missing or unexpected key, or a shape mismatch, raises with the offending names.
* ``timm_dinov2_to_patch_embed(sd)``: the single place where timm's
  ``vit_large_patch14_reg4_dinov2`` names/layout map onto our DINOv2 patch embedding.
* ``hf_dinov2_to_patch_embed(sd)`` / ``load_dinov2_patch_embed_(vggt, sd)``: a transformers
  ``Dinov2Model`` (e.g. the real DINOv2-S/14 of :func:`models.vit.load_vit`, no registers) as the
  patch embedding: separate q/k/v stacked into the fused ``qkv``, LayerScale and norms renamed.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

HEADS = ("camera_head", "depth_head", "point_head", "track_head")


def _summarise(names: list[str], limit: int = 12) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f", ... ({len(names) - limit} more)" if len(names) > limit else "")


def load_official_state_dict(model: nn.Module, state_dict: Mapping[str, Tensor], assign: bool = False) -> list[str]:
    """Strictly load an official-named state dict, skipping only the keys of disabled heads.

    Args:
        model: a ``VGGT`` (any config); heads set to None are treated as disabled.
        state_dict: official names, e.g. ``aggregator.frame_blocks.0.attn.qkv.weight``.
            A leading ``module.`` (DDP) prefix is stripped.
        assign: passed to ``load_state_dict`` (use True for a model built on the meta device).

    Returns:
        The skipped keys (those of disabled heads).

    Raises:
        KeyError: a key other than a disabled head's is missing or unexpected.
        ValueError: a tensor has the wrong shape.
    """
    sd = {k.removeprefix("module."): v for k, v in state_dict.items()}
    disabled = tuple(f"{h}." for h in HEADS if getattr(model, h, "absent") is None)
    skipped = [k for k in sd if k.startswith(disabled)] if disabled else []
    for k in skipped:
        del sd[k]
    if skipped:
        logger.info("skipping %d keys of disabled heads %s", len(skipped), [d[:-1] for d in disabled])

    own = model.state_dict()
    missing = sorted(set(own) - set(sd))
    unexpected = sorted(set(sd) - set(own))
    if missing or unexpected:
        raise KeyError(
            "state dict does not match the model: "
            + (f"missing {len(missing)} [{_summarise(missing)}]" if missing else "")
            + ("; " if missing and unexpected else "")
            + (f"unexpected {len(unexpected)} [{_summarise(unexpected)}]" if unexpected else "")
            + ". Check that the config matches the checkpoint (VGGTConfig() for VGGT-1B)."
        )
    bad = [f"{k}: {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in own if sd[k].shape != own[k].shape]
    if bad:
        raise ValueError(f"shape mismatch in {len(bad)} tensors: {_summarise(bad)}")
    model.load_state_dict(sd, strict=True, assign=assign)
    return skipped


def timm_dinov2_to_patch_embed(timm_state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Convert a timm ``vit_*_patch14_reg4_dinov2`` state dict to our ``DinoV2PatchEmbed`` names.

    timm keeps the same block names (``blocks.N.{norm1, attn.qkv, attn.proj, ls1.gamma, norm2,
    mlp.fc1, mlp.fc2, ls2.gamma}``, ``patch_embed.proj``, ``norm``) but differs in
    three places, mapped here:

    * ``reg_token [1, R, C]`` -> ``register_tokens``;
    * ``pos_embed [1, hw, C]`` has no class slot (timm ``no_embed_class=True``; the class
      position, if any, is folded into ``cls_token``) -> prepend a zero row, so
      ``cls_token + pos_embed[:, 0]`` equals timm's class token;
    * no ``mask_token`` -> zeros (unused at inference).

    Classifier keys (``head.*``, ``fc_norm.*``) are dropped; any other unknown key raises.

    Args:
        timm_state_dict: ``timm_model.state_dict()``.
        prefix: prepended to every output key, e.g. ``"aggregator.patch_embed."`` for a VGGT.
    """
    out: dict[str, Tensor] = {}
    for key, value in timm_state_dict.items():
        if key.startswith(("head.", "fc_norm.")):
            continue
        if key == "reg_token":
            out["register_tokens"] = value
        elif key == "pos_embed":
            out["pos_embed"] = torch.cat([value.new_zeros(1, 1, value.shape[-1]), value], dim=1)
        elif key == "cls_token" or key.startswith(("patch_embed.proj.", "blocks.", "norm.")):
            out[key] = value
        else:
            raise KeyError(f"unknown timm DINOv2 key {key!r}; only reg4 DINOv2 ViTs (no_embed_class) are supported")
    if "register_tokens" not in out or "pos_embed" not in out:
        raise KeyError("not a DINOv2-with-registers state dict: reg_token / pos_embed missing")
    out["mask_token"] = out["cls_token"].new_zeros(1, out["cls_token"].shape[-1])
    return {prefix + k: v for k, v in out.items()}


_HF_BLOCK = {  # transformers Dinov2Layer suffix -> our Block suffix (q/k/v are stacked separately)
    "norm1.weight": "norm1.weight", "norm1.bias": "norm1.bias", "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias", "layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma",
    "mlp.fc1.weight": "mlp.fc1.weight", "mlp.fc1.bias": "mlp.fc1.bias", "mlp.fc2.weight": "mlp.fc2.weight",
    "mlp.fc2.bias": "mlp.fc2.bias", "attention.o_proj.weight": "attn.proj.weight",
    "attention.o_proj.bias": "attn.proj.bias", "attention.output.dense.weight": "attn.proj.weight",
    "attention.output.dense.bias": "attn.proj.bias",
}
_HF_QKV = {"q": ("attention.q_proj.", "attention.attention.query."),
           "k": ("attention.k_proj.", "attention.attention.key."),
           "v": ("attention.v_proj.", "attention.attention.value.")}
_HF_TOP = {"embeddings.cls_token": "cls_token", "embeddings.mask_token": "mask_token",
           "embeddings.position_embeddings": "pos_embed", "embeddings.patch_embeddings.projection.weight":
           "patch_embed.proj.weight", "embeddings.patch_embeddings.projection.bias": "patch_embed.proj.bias",
           "layernorm.weight": "norm.weight", "layernorm.bias": "norm.bias"}


def hf_dinov2_to_patch_embed(hf_state_dict: Mapping[str, Tensor], prefix: str = "") -> dict[str, Tensor]:
    """Convert a transformers ``Dinov2Model`` state dict (no registers) to our ``DinoV2PatchEmbed`` names.

    ``W_qkv = [W_q; W_k; W_v]`` (``[3C, C]``) and ``b_qkv = [b_q; b_k; b_v]``: our fused attention splits the
    ``3C`` outputs in this order.  Both transformers-5 (``q_proj``/``o_proj``) and transformers-4
    (``attention.attention.query``/``attention.output.dense``) names are accepted; a missing ``mask_token``
    becomes zeros (unused at inference).  Any other key raises.

    Args:
        hf_state_dict: ``Dinov2Model.state_dict()`` (or a ``VisionEncoder``'s with its ``model.`` prefix).
        prefix: prepended to every output key, e.g. ``"aggregator.patch_embed."`` for a VGGT.
    """
    sd = {k.removeprefix("model."): v for k, v in hf_state_dict.items()}
    if any("register_tokens" in k for k in sd):
        raise KeyError("this Dinov2 has register tokens; convert DINOv2-reg checkpoints with "
                       "timm_dinov2_to_patch_embed")
    out: dict[str, Tensor] = {}
    qkv: dict[str, dict[str, dict[str, Tensor]]] = {}
    for key, value in sd.items():
        if key in _HF_TOP:
            out[_HF_TOP[key]] = value
            continue
        parts = key.split(".")
        if parts[:2] != ["encoder", "layer"] or len(parts) < 4:
            raise KeyError(f"unknown transformers Dinov2 key {key!r}")
        index, suffix = parts[2], ".".join(parts[3:])
        if suffix in _HF_BLOCK:
            out[f"blocks.{index}.{_HF_BLOCK[suffix]}"] = value
            continue
        which = next((w for w, names in _HF_QKV.items() for n in names if suffix.startswith(n)), None)
        if which is None:
            raise KeyError(f"unknown transformers Dinov2 key {key!r}")
        qkv.setdefault(index, {}).setdefault(suffix.rsplit(".", 1)[-1], {})[which] = value
    for index, params in qkv.items():
        for kind, parts in params.items():
            if set(parts) != {"q", "k", "v"}:
                raise KeyError(f"layer {index}: {kind} of q/k/v incomplete ({sorted(parts)})")
            out[f"blocks.{index}.attn.qkv.{kind}"] = torch.cat([parts["q"], parts["k"], parts["v"]], 0)
    out.setdefault("mask_token", out["cls_token"].new_zeros(1, out["cls_token"].shape[-1]))
    return {prefix + k: v for k, v in out.items()}


def load_dinov2_patch_embed_(model: nn.Module, hf_state_dict: Mapping[str, Tensor]) -> None:
    """Strictly load a transformers DINOv2 (no registers) into ``model.aggregator.patch_embed``, in place.

    Raises:
        ValueError: the VGGT's backbone expects registers, or its sizes do not match the weights.
    """
    patch_embed = model.aggregator.patch_embed
    if getattr(patch_embed, "num_register_tokens", None) != 0:
        raise ValueError("this VGGT's DINOv2 backbone has register tokens; build it with backbone_register_tokens=0 "
                         "(VGGTConfig.small() does)")
    sd = hf_dinov2_to_patch_embed(hf_state_dict)
    own = patch_embed.state_dict()
    missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
    bad = [f"{k}: {tuple(sd[k].shape)} vs {tuple(own[k].shape)}"
           for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise ValueError(f"the DINOv2 weights do not fit this VGGT's patch embed: missing {_summarise(missing)}; "
                         f"unexpected {_summarise(unexpected)}; shapes {_summarise(bad)}")
    patch_embed.load_state_dict(sd, strict=True)
