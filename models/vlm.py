"""Vision-language models through ``transformers``: LLaVA, SmolVLM, Gemma 3 / 4, Qwen-VL, Mistral 3, InternVL.

A VLM here is ``vision tower -> projector -> language model``: the vision tower encodes image
patches, the projector maps them into the language model's residual stream, where they replace
the ``<image>`` placeholder tokens, and the causal LM generates the answer.  Families are told
apart by their *config class* (never by a name substring) and each names its three parts:

- ``llava`` (``LlavaConfig``): ``model.vision_tower`` (CLIP), ``model.multi_modal_projector``
  (``linear_1``, GELU, ``linear_2``), ``model.language_model``;
- ``llava_next`` (``LlavaNextConfig``): the same three, plus the learned ``model.image_newline``
  vector written into the stream after every row of image features (AnyRes);
- ``idefics3`` (``Idefics3Config``, SmolVLM): ``model.vision_model`` (SigLIP), ``model.connector``
  (pixel shuffle, then ``modality_projection.proj``), ``model.text_model``;
- ``gemma3`` (``Gemma3Config``, Gemma 3 4B / 12B / 27B): ``model.vision_tower`` (SigLIP),
  ``model.multi_modal_projector`` (average pooling to ``mm_tokens_per_image``, an RMSNorm, then a raw
  weight matrix ``mm_input_projection_weight``: no ``nn.Linear``, so no projector targets),
  ``model.language_model`` (Gemma 3's text decoder: post-norms, rotated at the readers, so the projector's
  output need not turn); the processor's ``token_type_ids`` mark the image tokens, which attend to each
  other both ways;
- ``qwen2_vl`` / ``qwen2_5_vl`` (``Qwen2VLConfig`` / ``Qwen2_5_VLConfig``): ``model.visual`` (a ViT with one
  fused ``qkv`` per block over dynamic-resolution patches), whose ``merger`` (2x2 patch merge, ``mlp.0``, GELU,
  ``mlp.2``) is the projector, ``model.language_model`` (Qwen2 with multimodal RoPE: 3-D positions from the
  image grid, so no latent KV cache);
- ``qwen3_vl`` (``Qwen3VLConfig``): the same parts (``merger``: LayerNorm, ``linear_fc1``, GELU, ``linear_fc2``),
  plus *deepstack*: features of some ViT blocks pass through their own mergers
  (``model.visual.deepstack_merger_list.i``) and are added to the stream at the image positions after the
  first decoder layers, so those mergers' ``linear_fc2`` write into the stream too (``writer_lists``);
- ``qwen3_5`` / ``qwen3_5_moe`` (``Qwen3_5Config`` / ``Qwen3_5MoeConfig``, Qwen3.5): Qwen3-VL's ViT and merger
  without deepstack, and the Qwen3.5 hybrid decoder (Gated DeltaNet and gated full attention, a gated MLP or
  Qwen2-MoE experts; multimodal RoPE, no latent KV cache);
- ``mistral3`` (``Mistral3Config``, Mistral Small 3.1 / 3.2): ``model.vision_tower`` (Pixtral: rotary 2-D
  patch positions, separate q/k/v), ``model.multi_modal_projector`` (RMSNorm, a 2x2 patch merger's
  ``merging_layer``, ``linear_1``, GELU, ``linear_2``), ``model.language_model`` (Mistral);
- ``llava_onevision`` (``LlavaOnevisionConfig``): LLaVA-NeXT's parts and ``image_newline`` with a SigLIP tower
  and a Qwen2 language model;
- ``internvl`` (``InternVLConfig``, InternVL 3 / 3.5): ``model.vision_tower`` (InternViT, separate q/k/v),
  ``model.multi_modal_projector`` (pixel shuffle, LayerNorm, ``linear_1``, GELU, ``linear_2``),
  ``model.language_model`` (Qwen2 / Qwen3 / LLaMA, resolved by its own config).
- ``gemma4`` (``Gemma4Config``, Gemma 4 E2B / E4B / 26B-A4B / 31B): ``model.vision_tower`` (its own ViT: 2-D rotary
  patch positions, q/k/v inside ``Gemma4ClippableLinear`` wrappers, pooled patches), ``model.embed_vision`` (an
  RMSNorm without scale, then ``embedding_projection``, the stream writer), ``model.language_model`` (Gemma 4's
  text decoder, :mod:`models.layouts.gemma4`: post-norms, rotated at the readers); the processor's
  ``mm_token_type_ids`` mark the image tokens, which attend to each other both ways.  An audio tower
  (``model.audio_tower``, E2B / E4B) is no part here: it is not a default target and the VQA data never reach it.

``lm_head`` is always the top-level ``lm_head``.

:func:`load_vlm` accepts a hub id (``llava-hf/llava-1.5-7b-hf``, ``llava-hf/llava-v1.6-vicuna-7b-hf``,
``HuggingFaceTB/SmolVLM-Instruct``, ``google/gemma-3-4b-it``, ``Qwen/Qwen2.5-VL-3B-Instruct``...), a local
``save_pretrained`` folder, or ``tiny-<family>`` for the in-process test models of :mod:`models.vlm_tiny`, or
``clip-smollm2``: the real towers assembled offline by :mod:`models.vlm_real` (its cached ``save_pretrained``
folder, built on first use).
Offline, a hub id must already be in the Hugging Face cache; otherwise the error says how to download
it and where to put it.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.causal_lm import _in_hub_cache, _looks_local, hub_offline

log = logging.getLogger(__name__)

TINY_PREFIX = "tiny-"
REAL_NAME = "clip-smollm2"  # the offline LLaVA assembly of models.vlm_real (CLIP ViT-B/16 + SmolLM2-135M)
DOWNLOAD_HINT = ("on a machine with internet run `hf download {repo} --local-dir checkpoints/{leaf}` "
                 "(huggingface_hub) and pass `checkpoints/{leaf}` as name_or_path")

__all__ = ["FAMILIES", "VLMFamily", "family_of", "fold_input_normalization_", "load_processor", "load_vlm",
           "resolve_vlm", "save_vlm",
           "vlm_parts"]


@dataclass(frozen=True)
class VLMFamily:
    """One VLM family: its transformers classes (by name, resolved lazily) and where its parts live.

    Args:
        name: short name (``llava``, ``llava_next``, ``idefics3``).
        config_class / model_class: class names in ``transformers``.
        vision_tower / projector / language_model: attribute paths inside the
            ``*ForConditionalGeneration`` model.
        projector_out: the projector's output layer (its output is written into the LM's residual stream), or
            ``None`` where that is no ``nn.Linear`` (Gemma 3's ``mm_input_projection_weight``).
        stream_vectors: learned vectors (attribute paths) written into the LM's residual stream.
        writer_lists: ``(module list, sub-path)`` pairs: every element of the list has a stream writer at that
            sub-path (Qwen3-VL's deepstack mergers).
    """

    name: str
    config_class: str
    model_class: str
    vision_tower: str
    projector: str
    language_model: str
    projector_out: str | None
    stream_vectors: tuple[str, ...] = ()
    writer_lists: tuple[tuple[str, str], ...] = ()

    def classes(self) -> tuple[type, type]:
        import transformers

        try:
            return getattr(transformers, self.config_class), getattr(transformers, self.model_class)
        except AttributeError:
            raise ImportError(f"this transformers ({transformers.__version__}) has no {self.model_class}; "
                              "upgrade it (`pip install -U transformers`)") from None


FAMILIES: dict[str, VLMFamily] = {
    f.name: f for f in (
        VLMFamily("llava", "LlavaConfig", "LlavaForConditionalGeneration", "model.vision_tower",
                  "model.multi_modal_projector", "model.language_model", "model.multi_modal_projector.linear_2"),
        VLMFamily("llava_next", "LlavaNextConfig", "LlavaNextForConditionalGeneration", "model.vision_tower",
                  "model.multi_modal_projector", "model.language_model", "model.multi_modal_projector.linear_2",
                  stream_vectors=("model.image_newline",)),
        VLMFamily("idefics3", "Idefics3Config", "Idefics3ForConditionalGeneration", "model.vision_model",
                  "model.connector", "model.text_model", "model.connector.modality_projection.proj"),
        VLMFamily("gemma3", "Gemma3Config", "Gemma3ForConditionalGeneration", "model.vision_tower",
                  "model.multi_modal_projector", "model.language_model", None),
        VLMFamily("qwen2_vl", "Qwen2VLConfig", "Qwen2VLForConditionalGeneration", "model.visual",
                  "model.visual.merger", "model.language_model", "model.visual.merger.mlp.2"),
        VLMFamily("qwen2_5_vl", "Qwen2_5_VLConfig", "Qwen2_5_VLForConditionalGeneration", "model.visual",
                  "model.visual.merger", "model.language_model", "model.visual.merger.mlp.2"),
        VLMFamily("qwen3_vl", "Qwen3VLConfig", "Qwen3VLForConditionalGeneration", "model.visual",
                  "model.visual.merger", "model.language_model", "model.visual.merger.linear_fc2",
                  writer_lists=(("model.visual.deepstack_merger_list", "linear_fc2"),)),
        VLMFamily("qwen3_5", "Qwen3_5Config", "Qwen3_5ForConditionalGeneration", "model.visual",
                  "model.visual.merger", "model.language_model", "model.visual.merger.linear_fc2"),
        VLMFamily("qwen3_5_moe", "Qwen3_5MoeConfig", "Qwen3_5MoeForConditionalGeneration", "model.visual",
                  "model.visual.merger", "model.language_model", "model.visual.merger.linear_fc2"),
        VLMFamily("mistral3", "Mistral3Config", "Mistral3ForConditionalGeneration", "model.vision_tower",
                  "model.multi_modal_projector", "model.language_model", "model.multi_modal_projector.linear_2"),
        VLMFamily("llava_onevision", "LlavaOnevisionConfig", "LlavaOnevisionForConditionalGeneration",
                  "model.vision_tower", "model.multi_modal_projector", "model.language_model",
                  "model.multi_modal_projector.linear_2", stream_vectors=("model.image_newline",)),
        VLMFamily("internvl", "InternVLConfig", "InternVLForConditionalGeneration", "model.vision_tower",
                  "model.multi_modal_projector", "model.language_model", "model.multi_modal_projector.linear_2"),
        VLMFamily("gemma4", "Gemma4Config", "Gemma4ForConditionalGeneration", "model.vision_tower",
                  "model.embed_vision", "model.language_model", "model.embed_vision.embedding_projection"),
    )
}


def family_of(model_or_config: Any) -> VLMFamily:
    """The family whose config class ``model_or_config`` (a model or its config) is an instance of."""
    config = getattr(model_or_config, "config", model_or_config)
    for family in FAMILIES.values():
        try:
            config_cls, _ = family.classes()
        except ImportError:
            continue
        if isinstance(config, config_cls):
            return family
    raise ValueError(f"{type(config).__name__} is not a supported VLM config; supported: "
                     f"{', '.join(f.config_class for f in FAMILIES.values())}")


def vlm_parts(model: nn.Module) -> dict[str, str]:
    """``{"vision_tower", "projector", "language_model", "lm_head"}`` -> module names in ``model``.

    Checks that the parts exist and that the language model owns the input embedding, so a
    changed transformers layout fails here, with the names, instead of compressing the wrong modules.
    """
    family = family_of(model)
    parts = {"vision_tower": family.vision_tower, "projector": family.projector,
             "language_model": family.language_model}
    for role, path in parts.items():
        try:
            model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"{type(model).__name__} has no {role} at {path!r}; this transformers version lays the "
                             f"{family.name} model out differently") from None
    lm = model.get_submodule(family.language_model)
    if getattr(lm, "embed_tokens", None) is not model.get_input_embeddings():
        raise ValueError(f"{family.language_model!r} does not own the input embedding of {type(model).__name__}")
    head = model.get_output_embeddings()
    parts["lm_head"] = next(n for n, m in model.named_modules() if m is head)
    return parts


@torch.no_grad()
def fold_input_normalization_(linear: nn.Linear, mean: torch.Tensor, std: torch.Tensor) -> nn.Linear:
    """Make ``linear`` compute ``old((x - mean) / std)`` with its own weights, in place::

        W <- W diag(1 / std),    b <- b - W_new mean

    The layer stays an ``nn.Linear`` (a LLaVA projector keeps its architecture); only its initial function
    changes.  ``mean`` and ``std`` are per input channel; ``std`` must be positive."""
    if not isinstance(linear, nn.Linear) or linear.bias is None:
        raise ValueError(f"folding a normalization needs an nn.Linear with a bias, got {linear}")
    n = linear.in_features
    if mean.shape != (n,) or std.shape != (n,):
        raise ValueError(f"mean and std must have shape ({n},), got {tuple(mean.shape)} and {tuple(std.shape)}")
    if not bool(torch.isfinite(mean).all() and torch.isfinite(std).all() and (std > 0).all()):
        raise ValueError("mean must be finite and std finite and > 0 in every channel")
    w = linear.weight.double() / std.double().to(linear.weight.device)
    b = linear.bias.double() - w @ mean.double().to(linear.weight.device)
    linear.weight.copy_(w.to(linear.weight.dtype))
    linear.bias.copy_(b.to(linear.bias.dtype))
    return linear


# -- loading --------------------------------------------------------------------------------------
def _read_config_json(path: Path) -> dict:
    try:
        return json.loads((path / "config.json").read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise FileNotFoundError(f"{path} has no readable config.json ({err}): put a transformers save_pretrained "
                                "folder there (config.json, *.safetensors, processor and tokenizer files)") from err


def _check_hf_format(raw: dict, where: str) -> None:
    """Original LLaVA-repo checkpoints (``llava_llama``...) are not transformers VLM checkpoints."""
    model_type = raw.get("model_type", "")
    known = {"llava", "llava_next", "llava_onevision", "idefics3", "gemma3", "qwen2_vl", "qwen2_5_vl", "qwen3_vl",
             "qwen3_5", "qwen3_5_moe", "mistral3", "internvl", "gemma4"}
    if model_type not in known:
        hint = (" This is an original LLaVA-repo checkpoint; use its transformers conversion instead "
                "(llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-vicuna-7b-hf, llava-hf/llava-v1.6-vicuna-13b-hf)."
                if model_type.startswith("llava") else "")
        raise ValueError(f"{where}: model_type {model_type!r} is not a supported VLM ({sorted(known)}).{hint}")


def resolve_vlm(name_or_path: str) -> str:
    """Where ``from_pretrained`` should read ``name_or_path``: a local folder, or the hub id itself."""
    if name_or_path == REAL_NAME:
        from models.vlm_real import cached_clip_smollm2

        return str(cached_clip_smollm2())
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        _check_hf_format(_read_config_json(path), str(path))
        return str(path)
    if _looks_local(name_or_path) or path.exists():
        raise FileNotFoundError(f"no VLM folder at {path}: pass a folder written by save_pretrained (config.json, "
                                "*.safetensors, processor and tokenizer files), a hub id, clip-smollm2, or "
                                "tiny-llava / tiny-llava_next / tiny-idefics3 / tiny-gemma3 / tiny-qwen2_5_vl / "
                                "tiny-qwen3_vl / tiny-qwen3_5 / tiny-mistral3 / tiny-internvl / tiny-llava_onevision / "
                                "tiny-gemma4")
    if hub_offline() and not _in_hub_cache(name_or_path):
        leaf = name_or_path.rsplit("/", 1)[-1]
        raise FileNotFoundError(
            f"VLM {name_or_path!r} is not in the local Hugging Face cache and the hub is disabled "
            f"(HF_HUB_OFFLINE / TRANSFORMERS_OFFLINE): {DOWNLOAD_HINT.format(repo=name_or_path, leaf=leaf)}")
    return name_or_path


def load_processor(name_or_path: str) -> Any:
    """The processor (image processor + tokenizer + chat template) of :func:`load_vlm`'s model."""
    if name_or_path.startswith(TINY_PREFIX):
        from models.vlm_tiny import build_tiny_processor

        return build_tiny_processor(name_or_path[len(TINY_PREFIX):])
    from transformers import AutoProcessor

    where = resolve_vlm(name_or_path)
    try:
        return AutoProcessor.from_pretrained(where, local_files_only=hub_offline())
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the processor of {name_or_path!r} from {where}: {err}") from err


def load_vlm(name_or_path: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> tuple[nn.Module, Any]:
    """``(model, processor)`` in eval mode.

    Args:
        name_or_path: a hub id (online, or already in the Hugging Face cache), a local
            ``save_pretrained`` folder, ``clip-smollm2`` (:mod:`models.vlm_real`), or
            ``tiny-llava`` / ``tiny-llava_next`` / ``tiny-idefics3`` / ``tiny-gemma3`` / ``tiny-qwen2_5_vl`` /
            ``tiny-qwen3_vl`` / ``tiny-qwen3_5`` / ``tiny-mistral3`` / ``tiny-internvl`` / ``tiny-llava_onevision`` /
            ``tiny-gemma4``
            (random-init test models built in-process,
            seeded with ``seed``).
        dtype: parameter dtype.
        seed: initialisation seed of the tiny models (ignored otherwise).
    """
    if name_or_path.startswith(TINY_PREFIX):
        from models.vlm_tiny import build_tiny_vlm

        model, processor = build_tiny_vlm(name_or_path[len(TINY_PREFIX):], seed=seed)
        return model.to(dtype).eval(), processor
    from transformers import AutoConfig

    where = resolve_vlm(name_or_path)
    offline = hub_offline()
    try:
        config = AutoConfig.from_pretrained(where, local_files_only=offline)
    except (OSError, ValueError) as err:
        leaf = name_or_path.rsplit("/", 1)[-1]
        raise FileNotFoundError(f"cannot read the config of VLM {name_or_path!r} ({err}); "
                                f"{DOWNLOAD_HINT.format(repo=name_or_path, leaf=leaf)}") from err
    family = family_of(config)
    _, model_cls = family.classes()
    try:
        model = model_cls.from_pretrained(where, config=config, dtype=dtype, local_files_only=offline)
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot load the weights of VLM {name_or_path!r} from {where} ({err}); the folder "
                                "needs config.json and the *.safetensors shards with their index") from err
    processor = load_processor(name_or_path)
    log.info("loaded %s (%s, %.1f M parameters, %s)", name_or_path, type(model).__name__,
             sum(p.numel() for p in model.parameters()) / 1e6, dtype)
    return model.eval(), processor


def save_vlm(model: nn.Module, processor: Any, folder: str | os.PathLike) -> Path:
    """``save_pretrained`` of a (dense) VLM and its processor, written atomically."""
    from models.assets import atomic_directory

    folder = Path(folder)
    with atomic_directory(folder) as tmp:
        model.save_pretrained(tmp)
        processor.save_pretrained(tmp)
    return folder
