"""Instruction finetuning data (alpaca format) for the LoRA recovery stages.

Records are ``{"instruction", "input", "output"}`` from a JSON list or a JSONL file.  Each
becomes the standard alpaca prompt followed by the response and EOS::

    Below is an instruction that describes a task[, paired with an input ...]. Write a response ...

    ### Instruction:
    {instruction}

    [### Input:
    {input}

    ]### Response:
    {output}<eos>

Prompt and response are tokenized separately and concatenated, so the prompt/response
boundary is exact: ``labels`` are ``-100`` on every prompt token (and on padding) and equal
``input_ids`` on the response and EOS -- only the response is learned.  The loss of
``CausalLMSpec`` shifts labels itself (HF convention).  Examples are cut to ``max_length``
tokens (response tail first); an example whose prompt alone fills ``max_length`` has nothing
to learn and is dropped (counted in the log).  Batches are right-padded to their longest
example with an ``attention_mask``.

The calibration loader (for ``WhiteningCollection``) feeds the first ``calibration_samples``
training examples one at a time, so no padding token ever enters the statistics.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.jsonfiles import DataFileError, iter_jsonl, load_json
from data.vocab import check_vocabulary

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(record: dict[str, str]) -> str:
    """The alpaca prompt of one record (the input section only when ``input`` is non-empty)."""
    if "instruction" not in record or "output" not in record:
        raise ValueError(f"alpaca records need 'instruction' and 'output' fields, got {sorted(record)}")
    template = PROMPT_WITH_INPUT if record.get("input", "").strip() else PROMPT_NO_INPUT
    return template.format(instruction=record["instruction"], input=record.get("input", ""))


def read_alpaca(path: str | Path) -> list[dict[str, str]]:
    """Records from a ``.json`` list or a ``.jsonl`` file (one object per line).

    Unparseable JSON and records that are not ``{"instruction": str, "output": str[, "input": str]}``
    are refused with one message naming the file and the line (JSONL) or record index (JSON).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"instruction data {path} does not exist")
    if path.suffix == ".jsonl":
        located = [(f"{path}:{line}", r) for line, r in iter_jsonl(path, "alpaca JSONL")]
    else:
        records = load_json(path, "alpaca JSON")
        if not isinstance(records, list):
            raise DataFileError(f"{path}: expected a JSON list of alpaca records (or use a .jsonl file)")
        located = [(f"{path} record {i}", r) for i, r in enumerate(records)]
    if not located:
        raise DataFileError(f"{path} holds no records")
    for where, record in located:
        if not isinstance(record, dict):
            raise DataFileError(f"{where}: expected an object with 'instruction' and 'output', got {record!r:.60}")
        missing = [k for k in ("instruction", "output") if k not in record]
        wrong = [k for k in ("instruction", "input", "output") if k in record and not isinstance(record[k], str)]
        if missing or wrong:
            problem = f"this one lacks {missing}" if missing else f"its {wrong} are not strings"
            raise DataFileError(f"{where}: an alpaca record needs 'instruction' and 'output' strings ('input' is "
                                f"optional); {problem}")
    return [r for _, r in located]


def encode(record: dict[str, str], tokenizer: Any, max_length: int) -> dict[str, torch.Tensor] | None:
    """``input_ids`` / ``labels`` (prompt masked) of one record, or ``None`` when the prompt fills ``max_length``."""
    prompt = tokenizer(alpaca_prompt(record), add_special_tokens=True)["input_ids"]
    response = tokenizer(record["output"], add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; instruction finetuning needs one to end responses")
    response = [*response, tokenizer.eos_token_id]
    if len(prompt) >= max_length:
        return None
    ids = (prompt + response)[:max_length]
    labels = ([IGNORE_INDEX] * len(prompt) + response)[:max_length]
    return {"input_ids": torch.tensor(ids, dtype=torch.long), "labels": torch.tensor(labels, dtype=torch.long)}


class InstructionDataset(Dataset):
    def __init__(self, examples: list[dict[str, torch.Tensor]]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return self.examples[i]


class PadCollator:
    """Right-pad a list of examples: ``input_ids`` with ``pad_id``, ``labels`` with -100, ``attention_mask`` 0."""

    def __init__(self, pad_id: int) -> None:
        self.pad_id = pad_id

    def __call__(self, examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        length = max(e["input_ids"].numel() for e in examples)
        ids = torch.full((len(examples), length), self.pad_id, dtype=torch.long)
        labels = torch.full((len(examples), length), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(examples), length), dtype=torch.long)
        for i, e in enumerate(examples):
            n = e["input_ids"].numel()
            ids[i, :n], labels[i, :n], mask[i, :n] = e["input_ids"], e["labels"], 1
        return {"input_ids": ids, "labels": labels, "attention_mask": mask}


class InstructionDataModule(LightningDataModule):
    """Alpaca-format instruction data with prompt tokens masked out of the loss.

    Args:
        train_path: ``.json`` (list) or ``.jsonl`` file of ``{"instruction", "input", "output"}`` records.
        tokenizer: a model name for :func:`models.causal_lm.load_causal_lm` (``smollm2-135m``, a local
            folder) whose tokenizer is used, or a tokenizer object.
        val_path: a separate validation file; without it, the last ``val_size`` training records
            are held out.
        val_size: records held out for validation when ``val_path`` is not given (0: no validation).
        max_length: tokens per example (prompt + response + EOS); longer examples lose their tail.
        batch_size: examples per batch.
        calibration_samples: training examples fed (one per batch, unpadded) to calibration.
        num_workers: dataloader workers.
    """

    test_names = ["instruct"]

    def __init__(
        self,
        train_path: str,
        tokenizer: Any = "smollm2-135m",
        val_path: str | None = None,
        val_size: int = 0,
        max_length: int = 512,
        batch_size: int = 4,
        calibration_samples: int = 32,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {max_length}")
        if val_size < 0 or calibration_samples < 1 or batch_size < 1:
            raise ValueError("val_size must be >= 0, calibration_samples and batch_size >= 1")
        for name, path in (("train_path", train_path), ("val_path", val_path)):
            if path is not None and not Path(path).expanduser().is_file():  # before any model or tokenizer loads
                raise FileNotFoundError(f"{name}={path!r} is not a file; give an alpaca .json or .jsonl file")
        self.train_path, self.val_path, self.val_size = train_path, val_path, val_size
        self.tokenizer_spec = tokenizer
        self.max_length, self.batch_size = max_length, batch_size
        self.calibration_samples, self.num_workers = calibration_samples, num_workers
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self._splits: dict[str, list[dict[str, torch.Tensor]]] = {}

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from models.causal_lm import SMOLLM2, cached_smollm2

            spec = self.tokenizer_spec
            self._tokenizer = AutoTokenizer.from_pretrained(cached_smollm2() if spec.lower() == SMOLLM2 else spec)
        return self._tokenizer

    @property
    def pad_id(self) -> int:
        tok = self.tokenizer
        return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id

    def check_model(self, model: Any) -> None:
        """Refuse ``model`` if it cannot embed this tokenizer's ids (:func:`data.vocab.check_vocabulary`);
        call once both exist.  Checks the encoded examples too when ``setup`` has run."""
        ids = [e["input_ids"].max().reshape(1) for split in self._splits.values() for e in split]
        spec = self.tokenizer_spec if isinstance(self.tokenizer_spec, str) else None
        check_vocabulary(self.tokenizer, model, torch.cat(ids) if ids else None, tokenizer_label=spec)

    def _encode_all(self, records: list[dict[str, str]], what: str) -> list[dict[str, torch.Tensor]]:
        out = [e for e in (encode(r, self.tokenizer, self.max_length) for r in records) if e is not None]
        if len(out) < len(records):
            log.warning("%s: dropped %d of %d examples whose prompt alone fills max_length=%d", what,
                        len(records) - len(out), len(records), self.max_length)
        if not out:
            raise ValueError(f"{what}: every example's prompt is longer than max_length={self.max_length}")
        return out

    def setup(self, stage: str | None = None) -> None:
        if "train" in self._splits:
            return
        records = read_alpaca(self.train_path)
        if self.val_path is not None:
            val = read_alpaca(self.val_path)
        elif self.val_size:
            if self.val_size >= len(records):
                raise ValueError(f"val_size={self.val_size} leaves no training records out of {len(records)}")
            records, val = records[: -self.val_size], records[-self.val_size :]
        else:
            val = []
        self._splits["train"] = self._encode_all(records, str(self.train_path))
        self._splits["val"] = self._encode_all(val, "validation") if val else []

    def _loader(self, split: str, batch_size: int, shuffle: bool = False) -> DataLoader:
        self.setup()
        data = self._splits["train"][: self.calibration_samples] if split == "calibration" else self._splits[split]
        if not data:
            raise ValueError(f"no {split} examples: give val_path or val_size > 0")
        return DataLoader(InstructionDataset(data), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=PadCollator(self.pad_id), num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration", batch_size=1)

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", self.batch_size)

    def test_dataloader(self) -> list[DataLoader]:
        return [self.val_dataloader()]


__all__ = ["IGNORE_INDEX", "InstructionDataModule", "PadCollator", "alpaca_prompt", "encode", "read_alpaca"]
