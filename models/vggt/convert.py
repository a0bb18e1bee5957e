"""State-dict conversion: official VGGT checkpoints and timm DINOv2 backbones.

* ``load_official_state_dict(model, sd)``: load a state dict in the official naming
  (facebook/VGGT-1B) into :class:`~models.vggt.model.VGGT`.  Keys of heads that the model
  was built without (e.g. ``track_head.*`` with ``enable_track=False``) are skipped; any
  other missing or unexpected key, or a shape mismatch, raises with the offending names.
* ``timm_dinov2_to_patch_embed(sd)``: the single place where timm's
  ``vit_large_patch14_reg4_dinov2`` names/layout map onto our DINOv2 patch embedding.
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
