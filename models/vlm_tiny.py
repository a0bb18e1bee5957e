"""Tiny random-init VLMs of each family with real processors, built in-process (tests, CPU demos).

Each tiny model has the real transformers architecture (CLIP or Idefics3/SigLIP vision tower,
the family's projector, a LLaMA language model with grouped-query attention) at toy sizes,
and a real processor: the family's image processor class at a toy resolution, the byte-level
tokenizer of :func:`models.causal_lm.build_byte_tokenizer` plus the family's special tokens,
and a chat template in the family's style:

==============  ====================================================  ==========================
family          prompt (one user turn with one image)                  image tokens per image
==============  ====================================================  ==========================
``llava``       ``USER: <image>\\n{text} ASSISTANT:``                  4 (28 px, patch 14)
``llava_next``  same                                                   4 per tile + newlines (AnyRes)
``idefics3``    ``User:<image>{text}<end_of_utterance>\\nAssistant:``  4 (32 px, patch 8, shuffle 2)
==============  ====================================================  ==========================

The assistant turn ends with the tokenizer's EOS (``<eos>``; ``<end_of_utterance>`` for
Idefics3), so a training target rendered by the template teaches the model where to stop.
Everything is deterministic: the same ``seed`` gives the same weights, and the processor does
not depend on the seed (a DataModule and a spec built separately agree).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from models.causal_lm import build_byte_tokenizer

TINY_FAMILIES = ("llava", "llava_next", "idefics3")
IDEFICS3_TOKENS = ("<fake_token_around_image>", "<image>", "<end_of_utterance>", "<global-img>",
                   *(f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)))
LLAVA_PINPOINTS = [[28, 28], [28, 56], [56, 28]]

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


def _check(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"no tiny VLM for family {family!r}; choose one of {TINY_FAMILIES}")


def build_tiny_tokenizer(family: str) -> Any:
    """Byte-level tokenizer + ``<pad>`` + the family's image (and turn) tokens, all special."""
    _check(family)
    tok = build_byte_tokenizer()
    extra = list(IDEFICS3_TOKENS) if family == "idefics3" else ["<image>"]
    tok.add_special_tokens({"pad_token": "<pad>", "additional_special_tokens": extra})
    if family == "idefics3":
        tok.add_special_tokens({"eos_token": "<end_of_utterance>"})
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
