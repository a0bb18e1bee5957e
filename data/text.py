"""Text DataModule for causal LMs: calibration, finetuning, validation and test token windows.

Windows are fixed-length token chunks of the tokenized corpus (documents joined with the
EOS token):

- evaluation (validation / test): non-overlapping ``seq_len`` windows -- the standard
  perplexity protocol; with ``eval_max_tokens`` set, that many tokens' worth of windows
  evenly spaced over the corpus (so a budget samples every play, not just the first);
- calibration: ``calibration_samples`` windows at random offsets (``seed``), drawn evenly
  from each component of a ``mix:`` source;
- finetuning: random windows as well (``finetune_samples``; all non-overlapping windows
  when ``None``).

Tokenized corpora and calibration windows are cached under ``cache_dir`` keyed by the
tokenizer's identity (name and a hash of its vocabulary), the source's content
fingerprint and, for calibration, the sample count, length and seed -- a cache can never
hand one model's tokens to another.  Cache files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from compression.io import atomic_torch_save
from data.corpora import load_documents, mix_components
from models.causal_lm import cache_root

log = logging.getLogger(__name__)

DEFAULT_TESTS = {"tragedies": "shakespeare:tragedies@test", "wiki": "wiki:test"}


class WindowDataset(Dataset):
    """Rows of a ``[N, T]`` token tensor as ``{"input_ids", "labels"}`` (labels = inputs; the loss shifts)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.windows[i]
        return {"input_ids": row, "labels": row}


def tokenizer_fingerprint(tokenizer: Any) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False).encode()
    name = str(getattr(tokenizer, "name_or_path", type(tokenizer).__name__)).encode()
    return hashlib.sha256(name + b"\0" + vocab).hexdigest()[:16]


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]``; at most ``max_tokens // seq_len`` of them, evenly spaced."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"corpus has {tokens.numel()} tokens, fewer than one window of {seq_len}")
    windows = tokens[: n * seq_len].view(n, seq_len)
    if max_tokens is not None and max_tokens // seq_len < n:
        keep = max(1, max_tokens // seq_len)
        windows = windows[torch.linspace(0, n - 1, keep).round().long()]
    return windows


def random_windows(tokens: torch.Tensor, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    if tokens.numel() <= seq_len:
        raise ValueError(f"corpus has {tokens.numel()} tokens, not enough for windows of {seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()])


class TextDataModule(LightningDataModule):
    """Token windows for calibration, finetuning, validation and test.

    Args:
        tokenizer: a model name for :func:`models.causal_lm.load_causal_lm` (``smollm2-135m``, a
            local folder) whose tokenizer is used, or a tokenizer object.
        calibration: source of calibration windows (see :mod:`data.corpora`); default mixes
            Shakespeare comedies and Wikipedia summaries.
        finetune: source of finetuning windows (LoRA stages).
        validation: source of validation windows.
        test: ``name -> source`` of test corpora, each its own dataloader; at least one should
            play no part in calibration or finetuning.
        seq_len: tokens per window.
        calibration_samples: number of calibration windows.
        finetune_samples: number of finetuning windows (``None``: every non-overlapping window).
        eval_max_tokens: tokens scored per validation/test corpus (``None``: the whole corpus).
        batch_size: windows per batch (all splits).
        seed: seed of the random windows.
        cache_dir: token cache folder (default ``$SVD_VGGT_CACHE/tokens``).
        num_workers: dataloader workers.
    """

    def __init__(
        self,
        tokenizer: Any = "smollm2-135m",
        calibration: str = "mix:shakespeare:comedies,wiki:calib",
        finetune: str = "shakespeare:histories",
        validation: str = "shakespeare:tragedies@val",
        test: dict[str, str] | None = None,
        seq_len: int = 256,
        calibration_samples: int = 64,
        finetune_samples: int | None = 256,
        eval_max_tokens: int | None = 16384,
        batch_size: int = 4,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2, got {seq_len}")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        self.tokenizer_spec = tokenizer
        self.calibration = calibration
        self.finetune = finetune
        self.validation = validation
        self.test = dict(test) if test is not None else dict(DEFAULT_TESTS)
        if not self.test:
            raise ValueError("test needs at least one corpus")
        self.seq_len = seq_len
        self.calibration_samples = calibration_samples
        self.finetune_samples = finetune_samples
        self.eval_max_tokens = eval_max_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = Path(cache_dir) if cache_dir else cache_root() / "tokens"
        self.num_workers = num_workers
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self._windows: dict[str, torch.Tensor] = {}

    @property
    def test_names(self) -> list[str]:
        return list(self.test)

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            from models.causal_lm import SMOLLM2, cached_smollm2

            spec = self.tokenizer_spec
            path = cached_smollm2() if spec.lower() == SMOLLM2 else spec
            self._tokenizer = AutoTokenizer.from_pretrained(path)
        return self._tokenizer

    # -- tokens -----------------------------------------------------------------------------------
    def tokens(self, source: str) -> torch.Tensor:
        """All tokens of one non-mix source (1-D, int64), cached."""
        documents, fingerprint = load_documents(source)
        tok = self.tokenizer
        path = self.cache_dir / f"{tokenizer_fingerprint(tok)}-{fingerprint}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        eos = tok.eos_token_id if tok.eos_token_id is not None else 0
        ids: list[int] = []
        for doc in documents:
            ids.extend(tok(doc, add_special_tokens=False)["input_ids"])
            ids.append(eos)
        tokens = torch.tensor(ids, dtype=torch.long)
        atomic_torch_save(tokens, path)
        log.info("tokenized %s: %d tokens (cached at %s)", source, tokens.numel(), path)
        return tokens

    def _calibration_windows(self) -> torch.Tensor:
        parts = mix_components(self.calibration)
        fps = [load_documents(p)[1] for p in parts]
        key = hashlib.sha256(json.dumps(
            [tokenizer_fingerprint(self.tokenizer), fps, self.calibration_samples, self.seq_len, self.seed]
        ).encode()).hexdigest()[:16]
        path = self.cache_dir / f"calib-{key}.pt"
        if path.is_file():
            return torch.load(path, weights_only=True)
        g = torch.Generator().manual_seed(self.seed)
        counts = [self.calibration_samples // len(parts) + (i < self.calibration_samples % len(parts))
                  for i in range(len(parts))]
        windows = torch.cat([random_windows(self.tokens(p), self.seq_len, c, g) for p, c in zip(parts, counts) if c])
        atomic_torch_save(windows, path)
        return windows

    def _eval_windows(self, source: str) -> torch.Tensor:
        return torch.cat([evaluation_windows(self.tokens(p), self.seq_len, self.eval_max_tokens)
                          for p in mix_components(source)])

    def _finetune_windows(self) -> torch.Tensor:
        tokens = torch.cat([self.tokens(p) for p in mix_components(self.finetune)])
        if self.finetune_samples is None:
            return evaluation_windows(tokens, self.seq_len, None)
        g = torch.Generator().manual_seed(self.seed + 1)
        return random_windows(tokens, self.seq_len, self.finetune_samples, g)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit"):
            self._windows.setdefault("calibration", self._calibration_windows())
            self._windows.setdefault("train", self._finetune_windows())
        if stage in (None, "fit", "validate"):
            self._windows.setdefault("val", self._eval_windows(self.validation))
        if stage in (None, "test", "fit"):  # fit: the dense-vs-compressed summary scores the test sets
            for name, source in self.test.items():
                self._windows.setdefault(f"test/{name}", self._eval_windows(source))

    def _loader(self, key: str, shuffle: bool = False) -> DataLoader:
        if key not in self._windows:
            self.setup(None)
        return DataLoader(WindowDataset(self._windows[key]), batch_size=self.batch_size, shuffle=shuffle,
                          num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(f"test/{name}") for name in self.test]
