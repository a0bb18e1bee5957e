"""Tiny random-init VLMs of each family with real processors, built in-process (tests, CPU demos).

Each tiny model has the real transformers architecture (CLIP or Idefics3/SigLIP vision tower,
the family's projector, a LLaMA language model with grouped-query attention; Gemma 3: SigLIP and
Gemma 3's own text decoder with sliding and full layers; Qwen2.5-VL: its windowed ViT, patch merger and
Qwen2 decoder with multimodal RoPE; Qwen3-VL: the same with Qwen3's decoder and one deepstack merger;
Qwen3.5: Qwen3-VL's ViT without deepstack and the Qwen3.5 hybrid decoder, a linear-attention and a full layer;
Mistral 3: Pixtral, its patch-merging projector and a Mistral decoder; InternVL: InternViT, its pixel-shuffle
projector and a Qwen2 decoder; LLaVA-OneVision: SigLIP, LLaVA's projector and a Qwen2 decoder) at toy sizes,
and a real processor: the family's image processor class at a toy resolution, the byte-level
tokenizer of :func:`models.causal_lm.build_byte_tokenizer` plus the family's special tokens,
and a chat template in the family's style:

==============  ====================================================  ==========================
family          prompt (one user turn with one image)                  image tokens per image
==============  ====================================================  ==========================
``llava``       ``USER: <image>\\n{text} ASSISTANT:``                  4 (28 px, patch 14)
``llava_next``  same                                                   4 per tile + newlines (AnyRes)
``idefics3``    ``User:<image>{text}<end_of_utterance>\\nAssistant:``  4 (32 px, patch 8, shuffle 2)
``gemma3``      ``<start_of_turn>user\\n<start_of_image>{text}``        4 (28 px, patch 7, pooled 2x2)
                ``<end_of_turn>\\n<start_of_turn>model\\n``
``qwen2_5_vl``  ``<|im_start|>user\\n<|vision_start|><|image_pad|>``   4-9 (dynamic resolution
                ``<|vision_end|>{text}<|im_end|>\\n``                   within 56²-84² px, patch 14,
                ``<|im_start|>assistant\\n``                            2x2 patches merged)
``qwen3_vl``    same                                                   4-9 (patch 16: 64²-96² px)
``qwen3_5``     same                                                   same
``mistral3``    ``[INST][IMG]{text}[/INST]``                           up to 2 x 2 + row breaks (32 px,
                                                                       patch 8, merge 2x2)
``internvl``    ChatML, the image as ``<img>`` + 4 ``<IMG_CONTEXT>``    4 (56 px, patch 14, pixel shuffle
                + ``</img>``                                           0.5, one tile)
``gemma4``      ``<|turn>user\\n<|image|>{text}<turn|>\\n``              up to 70 (patch 7, pooled 2x2,
                ``<|turn>model\\n``                                     aspect kept)
==============  ====================================================  ==========================

``llava_onevision`` renders LLaVA's prompt and tiles images as ``llava_next`` does (SigLIP, every patch's
features).

The assistant turn ends with the tokenizer's EOS (``<eos>``; ``<end_of_utterance>`` for
Idefics3, ``<end_of_turn>`` for Gemma 3, ``<turn|>`` for Gemma 4, ``<|im_end|>`` for Qwen-VL and InternVL), so a
training target rendered by the template teaches the model where to stop.
Everything is deterministic: the same ``seed`` gives the same weights, and the processor does
not depend on the seed (a DataModule and a spec built separately agree).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.causal_lm import build_byte_tokenizer

TINY_FAMILIES = ("llava", "llava_next", "idefics3", "gemma3", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "mistral3",
                 "internvl", "llava_onevision", "gemma4")
QWEN_VL = ("qwen2_5_vl", "qwen3_vl", "qwen3_5")
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
LLAVA_PINPOINTS = [[28, 28], [28, 56], [56, 28]]
# Gemma 3's named image tokens (its tokenizer's ``boi_token`` / ``image_token`` / ``eoi_token``) and turn markers
GEMMA3_IMAGE_TOKENS = {"boi_token": "<start_of_image>", "image_token": "<image_soft_token>",
                       "eoi_token": "<end_of_image>"}
GEMMA3_TURNS = ("<start_of_turn>", "<end_of_turn>")
# Gemma 4's named image and audio tokens (its processor reads all six from the tokenizer) and turn markers
GEMMA4_TOKENS = {"boi_token": "<|image>", "image_token": "<|image|>", "eoi_token": "<image|>",
                 "boa_token": "<|audio>", "audio_token": "<|audio|>", "eoa_token": "<audio|>"}
GEMMA4_TURNS = ("<|turn>", "<turn|>")
QWEN_VL_TOKENS = ("<|vision_start|>", "<|image_pad|>", "<|vision_end|>", "<|video_pad|>", "<|im_start|>", "<|im_end|>")
MISTRAL3_TOKENS = ("[IMG]", "[IMG_BREAK]", "[IMG_END]", "[INST]", "[/INST]")
# InternVL's named image tokens (its tokenizer's attributes) and ChatML turns
INTERNVL_IMAGE_TOKENS = {"start_image_token": "<img>", "end_image_token": "</img>",
                         "context_image_token": "<IMG_CONTEXT>", "video_token": "<video>"}
# ViT patch; images resized to 4-6 merged tokens a side
QWEN_VL_PATCH = {"qwen2_5_vl": 14, "qwen3_vl": 16, "qwen3_5": 16}

# Jinja: HF renders chat templates with trim_blocks, so literal newlines go through {{ '\n' }}.
_LLAVA_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | upper }}: "
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{{ '\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "{% if m['role'] == 'assistant' %}<eos>{% endif %}{% if not loop.last %} {% endif %}{% endfor %}"
    "{% if add_generation_prompt %} ASSISTANT:{% endif %}"
)
_IDEFICS3_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}:"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_utterance>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)
_GEMMA3_TEMPLATE = (
    "{% for m in messages %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}{{ '\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<start_of_image>{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<end_of_turn>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model{{ '\n' }}{% endif %}"
)
_GEMMA4_TEMPLATE = (
    "{% for m in messages %}<|turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}{{ '\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|image|>{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<turn|>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|turn>model{{ '\n' }}{% endif %}"
)
_MISTRAL3_TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'user' %}[INST]"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}[IMG]{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}[/INST]"
    "{% else %}{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}<eos>"
    "{% endif %}{% endfor %}"
)
_INTERNVL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<IMG_CONTEXT>{{ '\n' }}{% endif %}{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)
_QWEN_VL_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}{{ '\n' }}"
    "{% for c in m['content'] %}{% if c['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>{% endif %}"
    "{% endfor %}"
    "{% for c in m['content'] %}{% if c['type'] == 'text' %}{{ c['text'] }}{% endif %}{% endfor %}"
    "<|im_end|>{{ '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant{{ '\n' }}{% endif %}"
)


def _check(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny VLM for family {family!r}; choose one of {TINY_FAMILIES}")


def build_tiny_tokenizer(family: str) -> Any:
    """Byte-level tokenizer + ``<pad>`` + the family's image (and turn) tokens, all special."""
    _check(family)
    tok = build_byte_tokenizer()
    extra = {"idefics3": list(IDEFICS3_TOKENS), "gemma3": [*GEMMA3_IMAGE_TOKENS.values(), *GEMMA3_TURNS],
             "gemma4": [*GEMMA4_TOKENS.values(), *GEMMA4_TURNS],
             "mistral3": list(MISTRAL3_TOKENS),
             "internvl": [*INTERNVL_IMAGE_TOKENS.values(), "<|im_start|>", "<|im_end|>"],
             **dict.fromkeys(QWEN_VL, list(QWEN_VL_TOKENS))}.get(family, ["<image>"])
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": extra})
    if family == "idefics3":
        tok.add_special_tokens({"eos_token": "<end_of_utterance>"})
    if family == "gemma3":
        tok.add_special_tokens({"eos_token": "<end_of_turn>"})
        tok._set_model_specific_special_tokens(GEMMA3_IMAGE_TOKENS)  # tok.boi_token(_id)..., saved with it
    if family == "gemma4":
        tok.add_special_tokens({"eos_token": "<turn|>"})
        tok._set_model_specific_special_tokens(GEMMA4_TOKENS)
    if family in (*QWEN_VL, "internvl"):
        tok.add_special_tokens({"eos_token": "<|im_end|>"})
    if family == "internvl":
        tok._set_model_specific_special_tokens(INTERNVL_IMAGE_TOKENS)
    return tok


def build_tiny_processor(family: str) -> Any:
    """The real processor class of ``family`` at toy sizes (see module docstring)."""
    _check(family)
    tok = build_tiny_tokenizer(family)
    if family == "llava":
        from transformers import CLIPImageProcessor, LlavaProcessor

        ip = CLIPImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        return LlavaProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                              vision_feature_select_strategy="default", num_additional_image_tokens=1,
                              chat_template=_LLAVA_TEMPLATE)
    if family == "llava_next":
        from transformers import LlavaNextImageProcessor, LlavaNextProcessor

        ip = LlavaNextImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                                     image_grid_pinpoints=LLAVA_PINPOINTS)
        return LlavaNextProcessor(image_processor=ip, tokenizer=tok, patch_size=14,
                                  vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                  chat_template=_LLAVA_TEMPLATE)
    if family == "gemma3":
        from transformers import Gemma3ImageProcessor, Gemma3Processor

        ip = Gemma3ImageProcessor(size={"height": 28, "width": 28}, do_pan_and_scan=False)
        return Gemma3Processor(image_processor=ip, tokenizer=tok, image_seq_length=4, chat_template=_GEMMA3_TEMPLATE)
    if family == "gemma4":
        from transformers import (
            Gemma4AudioFeatureExtractor,
            Gemma4ImageProcessor,
            Gemma4Processor,
            Gemma4VideoProcessor,
        )

        # aspect-preserving resize to at most 70 soft tokens (its smallest budget): patches of 7 px pooled 2x2
        ip = Gemma4ImageProcessor(patch_size=7, max_soft_tokens=70, pooling_kernel_size=2)
        return Gemma4Processor(feature_extractor=Gemma4AudioFeatureExtractor(), image_processor=ip, tokenizer=tok,
                               video_processor=Gemma4VideoProcessor(), image_seq_length=70,
                               chat_template=_GEMMA4_TEMPLATE)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor

        ip = LlavaOnevisionImageProcessor(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                          image_grid_pinpoints=LLAVA_PINPOINTS)
        return LlavaOnevisionProcessor(image_processor=ip, tokenizer=tok,
                                       video_processor=LlavaOnevisionVideoProcessor(), num_image_tokens=4,
                                       vision_feature_select_strategy="full", chat_template=_LLAVA_TEMPLATE)
    if family == "internvl":
        from transformers import GotOcr2ImageProcessor, InternVLProcessor, InternVLVideoProcessor

        one_tile = dict(size={"height": 56, "width": 56}, crop_to_patches=False, max_patches=1, min_patches=1)
        return InternVLProcessor(image_processor=GotOcr2ImageProcessor(**one_tile), tokenizer=tok,
                                 video_processor=InternVLVideoProcessor(size={"height": 56, "width": 56}),
                                 image_seq_length=4, chat_template=_INTERNVL_TEMPLATE)
    if family == "mistral3":
        from transformers import PixtralImageProcessor, PixtralProcessor

        return PixtralProcessor(image_processor=PixtralImageProcessor(size={"longest_edge": 32}, patch_size=8),
                                tokenizer=tok, patch_size=8, spatial_merge_size=2, chat_template=_MISTRAL3_TEMPLATE)
    if family in QWEN_VL:
        import transformers

        patch = QWEN_VL_PATCH[family]
        sizes = dict(min_pixels=(4 * patch) ** 2, max_pixels=(6 * patch) ** 2, patch_size=patch, merge_size=2,
                     temporal_patch_size=2)
        processor, video = (("Qwen2_5_VLProcessor", "Qwen2VLVideoProcessor") if family == "qwen2_5_vl" else
                            ("Qwen3VLProcessor", "Qwen3VLVideoProcessor"))
        video_sizes = sizes if family == "qwen2_5_vl" else dict(
            size={"shortest_edge": sizes["min_pixels"], "longest_edge": sizes["max_pixels"]}, patch_size=patch,
            merge_size=2, temporal_patch_size=2)
        return getattr(transformers, processor)(
            image_processor=transformers.Qwen2VLImageProcessor(**sizes), tokenizer=tok,
            video_processor=getattr(transformers, video)(**video_sizes), chat_template=_QWEN_VL_TEMPLATE)
    from transformers import Idefics3ImageProcessor, Idefics3Processor

    ip = Idefics3ImageProcessor(size={"longest_edge": 32}, max_image_size={"longest_edge": 32},
                                do_image_splitting=False)
    return Idefics3Processor(image_processor=ip, tokenizer=tok, image_seq_len=4, chat_template=_IDEFICS3_TEMPLATE)


def tiny_config(family: str, tokenizer: Any, **text_overrides: Any) -> Any:
    """The tiny transformers config of ``family`` for ``tokenizer``'s vocabulary."""
    _check(family)
    from transformers import LlamaConfig

    text = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, bos_token_id=None,
                tie_word_embeddings=False)
    text.update(text_overrides)
    if family == "gemma3":
        return _gemma3_config(tokenizer, text)
    if family == "gemma4":
        return _gemma4_config(tokenizer, text)
    if family in QWEN_VL:
        return _qwen_vl_config(family, tokenizer, text)
    if family == "llava_onevision":
        from transformers import LlavaOnevisionConfig, Qwen2Config, SiglipVisionConfig

        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                    image_size=28, patch_size=14, vision_use_head=False)
        return LlavaOnevisionConfig(vision_config=vision, text_config=Qwen2Config(**text), vision_feature_layer=-1,
                                    image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
                                    vision_feature_select_strategy="full", image_grid_pinpoints=LLAVA_PINPOINTS,
                                    tie_word_embeddings=text["tie_word_embeddings"])
    if family == "internvl":
        from transformers import InternVLConfig, InternVLVisionConfig, Qwen2Config

        vision = InternVLVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=[56, 56], patch_size=[14, 14])
        return InternVLConfig(vision_config=vision, text_config=Qwen2Config(**text), downsample_ratio=0.5,
                              image_token_id=tokenizer.context_image_token_id, vision_feature_layer=-1,
                              tie_word_embeddings=text["tie_word_embeddings"])
    if family == "mistral3":
        from transformers import Mistral3Config, MistralConfig, PixtralVisionConfig

        vision = PixtralVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     head_dim=16, image_size=32, patch_size=8)
        return Mistral3Config(vision_config=vision, text_config=MistralConfig(**text), spatial_merge_size=2,
                              image_token_index=tokenizer.convert_tokens_to_ids("[IMG]"), vision_feature_layer=-1,
                              tie_word_embeddings=text["tie_word_embeddings"])
    image_token = tokenizer.convert_tokens_to_ids("<image>")
    if family in ("llava", "llava_next"):
        from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig

        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=28, patch_size=14)
        common = dict(vision_config=vision, text_config=LlamaConfig(**text), image_token_index=image_token,
                      vision_feature_layer=-1, vision_feature_select_strategy="default",
                      tie_word_embeddings=text["tie_word_embeddings"])
        if family == "llava":
            return LlavaConfig(image_seq_length=4, **common)
        return LlavaNextConfig(image_grid_pinpoints=LLAVA_PINPOINTS, **common)
    from transformers import Idefics3Config
    from transformers.models.idefics3.configuration_idefics3 import Idefics3VisionConfig

    vision = Idefics3VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                  image_size=32, patch_size=8)
    return Idefics3Config(vision_config=vision, text_config=LlamaConfig(**text), image_token_id=image_token,
                          scale_factor=2, tie_word_embeddings=text["tie_word_embeddings"])


def _gemma3_config(tokenizer: Any, text: dict) -> Any:
    """Gemma 3: SigLIP without its pooling head (28 px, patch 7: 16 patches pooled to 4 tokens) and Gemma 3's text
    decoder (head_dim 16, a sliding and a full layer) sized like the others."""
    from transformers import Gemma3Config, Gemma3TextConfig, SiglipVisionConfig

    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                image_size=28, patch_size=7, vision_use_head=False)
    text = dict(text, head_dim=16, sliding_window=8, layer_types=["sliding_attention", "full_attention"])
    return Gemma3Config(text_config=Gemma3TextConfig(**text), vision_config=vision, mm_tokens_per_image=4,
                        boi_token_index=tokenizer.boi_token_id, eoi_token_index=tokenizer.eoi_token_id,
                        image_token_index=tokenizer.image_token_id, tie_word_embeddings=text["tie_word_embeddings"])


def _gemma4_config(tokenizer: Any, text: dict) -> Any:
    """Gemma 4: its own ViT (two layers, 2-D rotary patch positions, 2x2 pooling; patch 7) and Gemma 4's text decoder
    (a sliding and a full layer; image tokens attend to each other both ways, marked by the processor's
    ``mm_token_type_ids``), no audio tower."""
    from transformers import Gemma4Config

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                  num_key_value_heads=2, head_dim=16, patch_size=7, pooling_kernel_size=2, position_embedding_size=64)
    text = dict(text, head_dim=16, global_head_dim=16, sliding_window=8, hidden_size_per_layer_input=0,
                layer_types=["sliding_attention", "full_attention"], use_bidirectional_attention="vision")
    return Gemma4Config(text_config=text, vision_config=vision, audio_config=None,
                        boi_token_id=tokenizer.boi_token_id, eoi_token_id=tokenizer.eoi_token_id,
                        image_token_id=tokenizer.image_token_id, boa_token_id=tokenizer.boa_token_id,
                        eoa_token_index=tokenizer.eoa_token_id, audio_token_id=tokenizer.audio_token_id,
                        video_token_id=tokenizer.convert_tokens_to_ids("<|video|>"),
                        tie_word_embeddings=text["tie_word_embeddings"])


def _qwen_vl_config(family: str, tokenizer: Any, text: dict) -> Any:
    """Qwen2.5-VL: a 2-block ViT (window attention in block 0, full in block 1) merging 2x2 patches into the
    language model's width, and Qwen2's decoder with multimodal RoPE (sections 2 + 3 + 3 of 8 frequencies).
    Qwen3-VL: a 2-block ViT with learned 4x4 position embeddings, a deepstack merger on block 0, and Qwen3's
    decoder (per-head q/k norms, head_dim 16) with the same multimodal RoPE.  Qwen3.5: Qwen3-VL's ViT without
    deepstack and the Qwen3.5 decoder (a Gated DeltaNet layer, then a gated full-attention layer)."""
    import transformers

    vision = dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=text["hidden_size"],
                  patch_size=QWEN_VL_PATCH[family], spatial_merge_size=2, temporal_patch_size=2)
    rope = {"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0}
    if family == "qwen2_5_vl":
        vision.update(window_size=56, fullatt_block_indexes=[1])
        text = dict(text, rope_parameters=rope)
    elif family == "qwen3_vl":
        vision.update(num_position_embeddings=16, deepstack_visual_indexes=[0])
        text = dict(text, head_dim=16, rope_parameters=rope)
    else:
        vision.update(num_position_embeddings=16)
        text = dict(text, head_dim=16, rope_parameters=dict(rope, partial_rotary_factor=1.0),
                    layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2,
                    linear_num_value_heads=2, linear_key_head_dim=8, linear_value_head_dim=8)
    ids = {k: tokenizer.convert_tokens_to_ids(t) for k, t in (("image_token_id", "<|image_pad|>"),
                                                               ("video_token_id", "<|video_pad|>"),
                                                               ("vision_start_token_id", "<|vision_start|>"))}
    config = getattr(transformers, {"qwen2_5_vl": "Qwen2_5_VLConfig", "qwen3_vl": "Qwen3VLConfig",
                                    "qwen3_5": "Qwen3_5Config"}[family])
    return config(text_config=text, vision_config=vision, tie_word_embeddings=text["tie_word_embeddings"], **ids)


def build_tiny_vlm(family: str, seed: int = 0, **text_overrides: Any) -> tuple[nn.Module, Any]:
    """``(model, processor)``: a random-init tiny VLM of ``family`` (eval mode) and its processor.

    ``text_overrides`` change the language model's ``LlamaConfig`` (e.g. ``tie_word_embeddings=True``).
    """
    from models.vlm import FAMILIES

    processor = build_tiny_processor(family)
    config = tiny_config(family, processor.tokenizer, **text_overrides)
    _, model_cls = FAMILIES[family].classes()
    with torch.random.fork_rng(devices=[]):  # seed the init without disturbing the caller's RNG
        torch.manual_seed(seed)
        model = model_cls(config)
    tok = processor.tokenizer
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.generation_config.bos_token_id = None
    return model.eval(), processor
