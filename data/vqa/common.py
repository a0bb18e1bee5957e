"""One VQA example type and the collation that turns examples into model batches via the model's processor.

Every dataset reader yields :class:`VQAExample` (an image path, the user's text, the training
target and what the metric needs).  :class:`VQACollator` renders each example with the
processor's own chat template -- one user turn ``[image, text]``, plus the assistant turn with
the target for training -- and lets the processor expand the image placeholders and produce
the pixel tensors, so every family gets exactly its native input format.

Training batches (``mode="train"``, right-padded)::

    {"input_ids" [B, T], "attention_mask" [B, T], "labels" [B, T], "pixel_values" ..., <family extras>}

``labels`` equal ``input_ids`` on the assistant's answer up to and including its first EOS, and
``-100`` on the prompt (image tokens included), on whatever the template puts after that EOS,
and on padding.  The answer's first character in the expanded text is located from the end
(``len(full) - len(answer)``: the processor only expands placeholders inside the prompt) and
mapped to tokens with the tokenizer's offsets, so no second tokenization of the prompt is
needed.  Evaluation batches (``mode="eval"``)::

    {"prompt": {left-padded generation inputs}, "full": {a training batch}, "task": str,
     "qid": [B], "choices": [B][k], "answer_index": [B], "answers": [B][10]}

``prompt`` feeds ``generate``; ``full`` gives the teacher-forced answer loss.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
TASKS = ("scienceqa", "vizwiz")
_META_KEYS = ("qid", "choices", "answer_index", "answers")


@dataclass
class VQAExample:
    """One question about one image.

    Args:
        qid: the dataset's question id.
        image: path of the image file.
        prompt: the user's text (question, options, instructions), without any image token.
        target: the training answer (ScienceQA: the option letter; VizWiz: the most common answer).
        task: ``scienceqa`` (multiple choice) or ``vizwiz`` (open answers).
        choices: the options (ScienceQA).
        answer_index: index of the correct option (ScienceQA), ``-1`` otherwise.
        answers: the human answers (VizWiz: ten).
        option_targets: the target each option would have if it were the right one (ScienceQA; likelihood
            scoring), empty when the reader cannot write them.
    """

    qid: str
    image: Path
    prompt: str
    target: str
    task: str
    choices: list[str] = field(default_factory=list)
    answer_index: int = -1
    answers: list[str] = field(default_factory=list)
    option_targets: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")


def load_image(path: Path) -> Image.Image:
    try:
        with Image.open(path) as img:
            return img.convert("RGB")
    except (OSError, ValueError) as err:
        raise FileNotFoundError(f"cannot read image {path}: {err}") from err


def _images_arg(processor: Any, images: list[Image.Image]) -> list:
    """Idefics3-style (and Gemma 3) processors take one list of images per text; LLaVA-style ones a flat list."""
    import transformers

    names = ("Idefics3Processor", "SmolVLMProcessor", "Gemma3Processor", "Gemma4Processor")
    nested = tuple(getattr(transformers, n) for n in names if hasattr(transformers, n))
    return [[img] for img in images] if isinstance(processor, nested) else images


class VQACollator:
    """``list[VQAExample] -> batch`` through ``processor`` (module docstring).

    Args:
        processor: a transformers VLM processor with a chat template.
        mode: ``train`` (prompt + answer, labels) or ``eval`` (generation prompt + the train batch + metadata).
    """

    def __init__(self, processor: Any, mode: str = "train") -> None:
        if mode not in ("train", "eval"):
            raise ValueError(f"collator mode must be 'train' or 'eval', got {mode!r}")
        if getattr(processor, "chat_template", None) is None:
            raise ValueError(f"{type(processor).__name__} has no chat template; VQA prompts are rendered with it")
        self.processor, self.mode = processor, mode
        self._warned = False

    @staticmethod
    def _user(example: VQAExample) -> list[dict]:
        return [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": example.prompt}]}]

    def prompt_text(self, example: VQAExample) -> str:
        return self.processor.apply_chat_template(self._user(example), add_generation_prompt=True)

    def full_text(self, example: VQAExample) -> tuple[str, str]:
        """``(full conversation text, answer suffix)``: the template's rendering with the assistant turn."""
        prompt = self.prompt_text(example)
        turn = {"role": "assistant", "content": [{"type": "text", "text": example.target}]}
        full = self.processor.apply_chat_template(self._user(example) + [turn])
        if not full.startswith(prompt) or example.target not in full[len(prompt):]:
            if not self._warned:
                log.warning("the chat template's assistant turn does not extend its generation prompt; "
                            "training targets are appended to the prompt as ' <answer><eos>'")
                self._warned = True
            full = f"{prompt} {example.target}{self.processor.tokenizer.eos_token or ''}"
        return full, full[len(prompt):]

    def _encode(self, texts: list[str], images: list[Image.Image], padding_side: str, offsets: bool) -> dict:
        tok = self.processor.tokenizer
        old, tok.padding_side = tok.padding_side, padding_side
        try:
            enc = self.processor(images=_images_arg(self.processor, images), text=texts, padding=True,
                                 return_tensors="pt", return_offsets_mapping=offsets)
        finally:
            tok.padding_side = old
        return dict(enc)

    def train_batch(self, examples: list[VQAExample], images: list[Image.Image]) -> dict[str, torch.Tensor]:
        pairs = [self.full_text(e) for e in examples]
        enc = self._encode([f for f, _ in pairs], images, "right", offsets=True)
        offsets = enc.pop("offset_mapping")  # [B, T, 2] character spans in the expanded text
        ids, mask = enc["input_ids"], enc["attention_mask"].bool()
        ends = offsets[..., 1].masked_fill(~mask, 0)
        text_len = ends.max(dim=1, keepdim=True).values  # length of each expanded text
        answer_start = text_len - torch.tensor([len(a) for _, a in pairs])[:, None]
        answer = mask & (ends > answer_start)
        eos = self.processor.tokenizer.eos_token_id
        if eos is not None:  # keep the answer up to its first EOS; what the template adds after it is not learned
            is_eos = answer & (ids == eos)
            after = (is_eos.long().cumsum(1) - is_eos.long()) > 0
            answer &= ~after
        if not answer.any(dim=1).all():
            bad = [e.qid for e, ok in zip(examples, answer.any(dim=1).tolist()) if not ok]
            raise ValueError(f"examples {bad[:3]} have no answer tokens after tokenization; check their targets")
        enc["labels"] = ids.masked_fill(~answer, IGNORE_INDEX)
        return enc

    def __call__(self, examples: list[VQAExample]) -> dict[str, Any]:
        if not examples:
            raise ValueError("empty batch")
        images = [load_image(e.image) for e in examples]
        train = self.train_batch(examples, images)
        if self.mode == "train":
            return train
        tasks = {e.task for e in examples}
        if len(tasks) != 1:
            raise ValueError(f"an evaluation batch mixes tasks {sorted(tasks)}")
        prompt = self._encode([self.prompt_text(e) for e in examples], images, "left", offsets=False)
        batch: dict[str, Any] = {"prompt": prompt, "full": train, "task": tasks.pop()}
        for key in _META_KEYS:
            batch[key] = [getattr(e, key) for e in examples]
        return batch


__all__ = ["IGNORE_INDEX", "TASKS", "VQACollator", "VQAExample", "load_image"]
