"""Text DataModule for causal LMs: calibration, finetuning, validation and test token windows.

Each source (see :mod:`data.corpora`) is tokenized once into one stream: its documents'
ids concatenated with the EOS id between them (``"\\n\\n"`` tokens if the tokenizer has no
EOS), without BOS or other special tokens.  Windows are fixed-length slices of that stream;
when the tokenizer itself starts every encoding with BOS (Gemma, LLaMA-2: ``bos=None`` probes it,
``True`` / ``False`` force it) each window is BOS followed by ``seq_len - 1`` stream tokens, so the
model sees the start-of-sequence token it was trained with (Gemma's perplexity without it is 4x
worse; ``bos=False`` reproduces the papers' plain slicing):

- evaluation (validation / test): the stream cut into non-overlapping ``seq_len`` windows,
  the tail shorter than a window dropped -- the standard perplexity protocol (GPTQ,
  SVD-LLM): every token is scored once, with the context available inside its window.
  With ``eval_max_tokens`` set, ``eval_max_tokens // seq_len`` of those windows are kept,
  evenly spaced over the stream (first and last included), so a budget still samples every
  play or article range rather than only the first;
- calibration: ``calibration_samples`` windows at uniformly random offsets drawn with
  ``seed``, split evenly over the components of a ``mix:`` source;
- finetuning: random windows too (``finetune_samples``; every non-overlapping window when
  ``None``), drawn with ``seed + 1`` from the components' concatenated streams (``finetune_mix="tokens"``,
  each component in proportion to its tokens) or split evenly over the components (``"even"``; a
  component shorter than its share gives overlapping windows, so its text is seen more than once).

Batches are ``{"input_ids": [B, T], "labels": [B, T]}`` with ``labels = input_ids`` (the
model's loss shifts them).  Token streams and calibration windows are cached under
``cache_dir`` as plain tensors, keyed by the tokenizer's fingerprint, the source's name and
content hash and, for calibration, the sample count, ``seq_len`` and seed (see
:mod:`data.cache`); a cache can never hand one tokenizer's ids to another, and a garbage cache
file is named in a warning and rebuilt.

Config errors surface at construction, before any tokenizer or model loads: every source name
is validated (:func:`data.corpora.check_source`), every non-``hf:`` source is read and must be
able to fill one window -- ``tokens <= UTF-8 bytes + 4 per document`` for byte-level and
byte-fallback tokenizers, so a corpus under that bound is surely too short.  The exact token
counts are checked again in ``prepare_data`` / ``setup`` (still before ``configure_model``).
Messages start with the field: ``calibration: ...``, ``test['wiki']: ...``.
"""

from __future__ import annotations

import logging
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.cache import cache_key, cached_tensor, token_check, tokenizer_fingerprint
from data.corpora import check_source, load_documents, mix_components
from data.vocab import check_vocabulary
from models.assets import cache_root

log = logging.getLogger(__name__)

DEFAULT_CALIBRATION = "mix:shakespeare:comedies,wiki:calib"
DEFAULT_FINETUNE = "shakespeare:histories"
DEFAULT_VALIDATION = "shakespeare:tragedies@val"
DEFAULT_TESTS = {"tragedies": "shakespeare:tragedies@test", "wiki": "wiki:test"}

__all__ = ["TextDataModule", "WindowDataset", "evaluation_windows", "random_windows", "tokenizer_fingerprint"]


class WindowDataset(Dataset):
    """Rows of a ``[N, T]`` token tensor as ``{"input_ids": [T], "labels": [T]}`` (labels = inputs)."""

    def __init__(self, windows: torch.Tensor) -> None:
        self.windows = windows

    def __len__(self) -> int:
        return self.windows.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = self.windows[i]
        return {"input_ids": row, "labels": row}


def evaluation_windows(tokens: torch.Tensor, seq_len: int, max_tokens: int | None = None) -> torch.Tensor:
    """Non-overlapping windows ``[N, seq_len]`` of a 1-D stream; at most ``max_tokens // seq_len``, evenly spaced."""
    n = tokens.numel() // seq_len
    if n == 0:
        raise ValueError(f"corpus has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    windows = tokens[: n * seq_len].view(n, seq_len)
    if max_tokens is not None and max_tokens // seq_len < n:
        keep = max(1, max_tokens // seq_len)
        windows = windows[torch.linspace(0, n - 1, keep).round().long()]
    return windows


def random_windows(tokens: torch.Tensor, seq_len: int, count: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` windows ``[count, seq_len]`` starting at uniform offsets in ``[0, len - seq_len]``."""
    if tokens.numel() < seq_len:
        raise ValueError(f"corpus has {tokens.numel()} tokens, fewer than one window of seq_len={seq_len}")
    starts = torch.randint(0, tokens.numel() - seq_len + 1, (count,), generator=generator)
    return torch.stack([tokens[s : s + seq_len] for s in starts.tolist()]) if count else tokens.new_empty(0, seq_len)


def _check_source(source: str, what: str) -> list[str]:
    try:
        return check_source(source)
    except ValueError as err:
        raise ValueError(f"{what}: {err}") from None


def even_counts(n: int, k: int) -> list[int]:
    """``n`` split over ``k`` parts as evenly as can be, the first parts taking the remainder."""
    return [n // k + (i < n % k) for i in range(k)]


def _token_bound(documents: list[str]) -> int:
    """An upper bound on the tokens of a stream, from bytes alone: byte-level BPE (and SentencePiece
    with byte fallback) never make more tokens than UTF-8 bytes, plus at most a prefix-space token
    per document and a separator of at most 3 tokens -- so a corpus under the bound is surely short."""
    return sum(len(d.encode()) + 4 for d in documents)


class TextDataModule(LightningDataModule):
    """Token windows of offline (or ``datasets``) text for calibration, finetuning, validation and test.

    Args:
        tokenizer: name for :func:`models.causal_lm.load_tokenizer` (``"smollm2-135m"``, a local
            ``save_pretrained`` folder, a ``.gguf`` file, a hub name when online) or a tokenizer object.
        calibration: source of the calibration windows (see :mod:`data.corpora`); the default
            mixes Shakespeare comedies and the Wikipedia ``calib`` split.
        finetune: source of the finetuning (LoRA) windows.
        validation: source(s) of the validation windows; a list is read as a mix.
        test: ``name -> source`` of the test corpora, one dataloader each (``test_names``);
            at least one should play no part in calibration or finetuning.  Default:
            ``tragedies`` (Shakespeare tragedies ``@test`` plays) and ``wiki`` (``wiki:test``).
        seq_len: tokens per window.
        calibration_samples: number of calibration windows.
        finetune_samples: number of finetuning windows (``None``: every non-overlapping window).
        finetune_mix: how a ``mix:`` finetuning source shares its windows: ``"tokens"`` draws them from the
            components' streams concatenated, so each component in proportion to its tokens (a large
            dictionary crowds out a small dialogue corpus); ``"even"`` draws ``finetune_samples`` split evenly
            over the components, each from its own stream, as the calibration windows are.
        eval_max_tokens: tokens scored per validation/test corpus (per mix component);
            ``None`` scores the whole corpus.
        val_max_tokens: tokens scored per validation mix component instead (``None``: ``eval_max_tokens``).
            A validation mix of corpora with the same count scores the geometric mean of their
            perplexities (one perplexity over equally many tokens of each).
        batch_size: windows per batch, every split.
        seed: seed of the calibration windows (finetuning uses ``seed + 1``, shuffling ``seed``).
        cache_dir: token cache folder (default ``$SVD_VGGT_CACHE/tokens``, else ``~/.cache/svd-vggt/tokens``).
        num_workers: dataloader worker processes.
        bos: start every window with the tokenizer's BOS token (``None``: exactly when the tokenizer
            adds BOS to an encoding by itself).
    """

    def __init__(
        self,
        tokenizer: Any = "smollm2-135m",
        calibration: str = DEFAULT_CALIBRATION,
        finetune: str = DEFAULT_FINETUNE,
        validation: str | list[str] = DEFAULT_VALIDATION,
        test: dict[str, str] | None = None,
        seq_len: int = 256,
        calibration_samples: int = 64,
        finetune_samples: int | None = 256,
        finetune_mix: str = "tokens",
        eval_max_tokens: int | None = 16384,
        val_max_tokens: int | None = None,
        batch_size: int = 4,
        seed: int = 0,
        cache_dir: str | None = None,
        num_workers: int = 0,
        bos: bool | None = None,
    ) -> None:
        super().__init__()
        if seq_len < 2:
            raise ValueError(f"seq_len must be >= 2 (one predicted token needs one of context), got {seq_len}")
        if calibration_samples < 1:
            raise ValueError(f"calibration_samples must be >= 1, got {calibration_samples}")
        if finetune_samples is not None and finetune_samples < 1:
            raise ValueError(f"finetune_samples must be >= 1 or None (all windows), got {finetune_samples}")
        if finetune_mix not in ("tokens", "even"):
            raise ValueError(f"finetune_mix must be 'tokens' (each mix component in proportion to its tokens) or "
                             f"'even' (finetune_samples split evenly over the components), got {finetune_mix!r}")
        if finetune_mix == "even" and finetune_samples is None:
            raise ValueError("finetune_mix='even' splits finetune_samples evenly over the mix components: set "
                             "finetune_samples to a number of windows, or use finetune_mix='tokens' to take every "
                             "non-overlapping window")
        for name, value in (("eval_max_tokens", eval_max_tokens), ("val_max_tokens", val_max_tokens)):
            if value is not None and value < seq_len:
                raise ValueError(f"{name}={value} is less than one window of seq_len={seq_len}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.tokenizer_spec = tokenizer
        self.calibration = calibration
        self.finetune = finetune
        self.validation = validation if isinstance(validation, str) else "mix:" + ",".join(validation)
        self.test = dict(test) if test is not None else dict(DEFAULT_TESTS)
        if not self.test:
            raise ValueError("test needs at least one corpus, e.g. {'wiki': 'wiki:test'}")
        self.roles = {"calibration": self.calibration, "finetune": self.finetune, "validation": self.validation,
                      **{f"test[{name!r}]": source for name, source in self.test.items()}}
        for role, source in self.roles.items():
            _check_source(source, role)
        self.seq_len = seq_len
        self.calibration_samples = calibration_samples
        self.finetune_samples = finetune_samples
        self.finetune_mix = finetune_mix
        self.eval_max_tokens = eval_max_tokens
        self.val_max_tokens = eval_max_tokens if val_max_tokens is None else val_max_tokens
        self.batch_size = batch_size
        self.seed = seed
        self.cache_dir = Path(cache_dir).expanduser() if cache_dir else cache_root() / "tokens"
        self.num_workers = num_workers
        self.bos = bos
        self._tokenizer = None if isinstance(tokenizer, str) else tokenizer
        self._tokenizer_id: str | None = None
        self._documents: dict[str, tuple[list[str], str]] = {}
        self._tokens: dict[str, torch.Tensor] = {}
        self._windows: dict[str, torch.Tensor] = {}
        self._check_lengths(self._documents_upper_bound, "bytes bound")

    # -- early checks (before any tokenizer or model loads) ------------------------------------
    def _documents_upper_bound(self, source: str) -> int | None:
        """Most tokens ``source`` can make (read now, kept for later); ``None`` for ``hf:`` (read in setup)."""
        if source.startswith("hf:"):
            return None
        return _token_bound(self.documents(source)[0])

    def _check_lengths(self, count, how: str, roles: list[str] | None = None) -> None:
        """Every source must give at least one ``seq_len`` window where it is used (finetuning: its
        components together; elsewhere each component, since each is windowed on its own)."""
        for role, source in self.roles.items():
            if roles is not None and role not in roles:
                continue
            counts = [(p, count(p)) for p in mix_components(source)]
            if role == "finetune" and self.finetune_mix == "tokens":  # drawn from the streams concatenated
                total = [n for _, n in counts]
                counts = [(source, None if None in total else sum(total))]
            for part, n in counts:
                if n is not None and n < self.seq_len:
                    exact = "has" if how == "tokens" else "has at most"
                    raise ValueError(
                        f"{role}: {part!r} {exact} {n} tokens, fewer than one window of seq_len={self.seq_len}; "
                        f"use a longer corpus or a smaller seq_len")

    # -- identity -------------------------------------------------------------------------------
    @property
    def test_names(self) -> list[str]:
        return list(self.test)

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from models.causal_lm import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_spec)
        return self._tokenizer

    @property
    def tokenizer_id(self) -> str:
        if self._tokenizer_id is None:
            self._tokenizer_id = tokenizer_fingerprint(self.tokenizer)
        return self._tokenizer_id

    @cached_property
    def bos_id(self) -> int | None:
        """The id each window starts with, or ``None`` for plain stream slices (see ``bos``)."""
        tok = self.tokenizer
        bos = getattr(tok, "bos_token_id", None)
        if self.bos is True and bos is None:
            raise ValueError("bos: true, but the tokenizer has no BOS token; set data.bos to false or null")
        if self.bos is None:
            return bos if bos is not None and tok("a", add_special_tokens=True)["input_ids"][:1] == [bos] else None
        return bos if self.bos else None

    @property
    def text_len(self) -> int:
        """Stream tokens per window: ``seq_len``, less one when windows start with BOS."""
        return self.seq_len - (self.bos_id is not None)

    def _with_bos(self, windows: torch.Tensor) -> torch.Tensor:
        if self.bos_id is None:
            return windows
        return torch.cat([windows.new_full((windows.shape[0], 1), self.bos_id), windows], 1)

    def documents(self, source: str) -> tuple[list[str], str]:
        """``(documents, fingerprint)`` of one non-mix source, read once per DataModule."""
        if source not in self._documents:
            self._documents[source] = load_documents(source)
        return self._documents[source]

    def check_model(self, model: Any) -> None:
        """Refuse ``model`` if it cannot embed this tokenizer's ids (:func:`data.vocab.check_vocabulary`);
        call once both exist (after ``configure_model``).  Checks every token stream read so far."""
        ids = [t.max().reshape(1) for t in (*self._tokens.values(), *self._windows.values()) if t.numel()]
        spec = self.tokenizer_spec if isinstance(self.tokenizer_spec, str) else None
        check_vocabulary(self.tokenizer, model, torch.cat(ids) if ids else None, tokenizer_label=spec)

    # -- tokens ---------------------------------------------------------------------------------
    def _tokenize(self, documents: list[str]) -> torch.Tensor:
        tok = self.tokenizer
        sep = [tok.eos_token_id] if tok.eos_token_id is not None else tok("\n\n", add_special_tokens=False)["input_ids"]
        ids: list[int] = []
        for doc_ids in tok(documents, add_special_tokens=False, verbose=False)["input_ids"]:
            ids.extend(doc_ids)
            ids.extend(sep)
        return torch.tensor(ids, dtype=torch.int32)

    def tokens(self, source: str) -> torch.Tensor:
        """The token stream (1-D, int64) of one non-mix source, cached on disk (and in memory)."""
        if source in self._tokens:
            return self._tokens[source]
        documents, fingerprint = self.documents(source)
        path = self.cache_dir / f"tokens-{cache_key(self.tokenizer_id, fingerprint)}.pt"
        tokens, hit = cached_tensor(path, lambda: self._tokenize(documents),
                                    check=token_check(len(self.tokenizer), ndim=1))
        if not hit:
            log.info("tokenized %s: %d documents -> %d tokens (cached at %s)", source, len(documents), tokens.numel(),
                     path)
        self._tokens[source] = tokens.long()
        return self._tokens[source]

    def calibration_windows(self) -> torch.Tensor:
        """``[calibration_samples, seq_len]`` random windows, split evenly over the mix components."""
        parts = mix_components(self.calibration)
        key = cache_key("calibration", self.tokenizer_id, [self.documents(p)[1] for p in parts],
                        self.calibration_samples, self.text_len, self.seed)

        def build() -> torch.Tensor:
            g = torch.Generator().manual_seed(self.seed)
            counts = even_counts(self.calibration_samples, len(parts))
            return torch.cat([random_windows(self.tokens(p), self.text_len, c, g) for p, c in zip(parts, counts)])

        check = token_check(len(self.tokenizer), shape=(self.calibration_samples, self.text_len))
        windows, _ = cached_tensor(self.cache_dir / f"calib-{key}.pt", build, check=check)
        return self._with_bos(windows.long())

    def finetune_windows(self) -> torch.Tensor:
        parts = mix_components(self.finetune)
        generator = torch.Generator().manual_seed(self.seed + 1)
        if self.finetune_mix == "even":  # the train loader shuffles, so grouping by component here is harmless
            counts = even_counts(self.finetune_samples, len(parts))
            for part, count in zip(parts, counts):
                available = self.tokens(part).numel()
                if count * self.text_len > available:
                    log.warning("finetune_mix='even': %s gives %d windows of %d tokens from %d tokens, so its text is "
                                "seen about %.1f times", part, count, self.text_len, available,
                                count * self.text_len / available)
            return self._with_bos(torch.cat([random_windows(self.tokens(p), self.text_len, c, generator)
                                             for p, c in zip(parts, counts)]))
        tokens = torch.cat([self.tokens(p) for p in parts])
        if self.finetune_samples is None:
            return self._with_bos(evaluation_windows(tokens, self.text_len))
        return self._with_bos(random_windows(tokens, self.text_len, self.finetune_samples, generator))

    def eval_windows(self, source: str, max_tokens: int | None = None) -> torch.Tensor:
        """Evaluation windows of a source (each mix component's windows, at most ``max_tokens`` of each
        (``None``: ``eval_max_tokens``), concatenated)."""
        max_tokens = self.eval_max_tokens if max_tokens is None else max_tokens
        return self._with_bos(torch.cat([evaluation_windows(self.tokens(p), self.text_len, max_tokens)
                                         for p in mix_components(source)]))

    # -- Lightning hooks ------------------------------------------------------------------------
    def prepare_data(self) -> None:
        """Fill the token caches once (rank zero), so DDP ranks only read them."""
        self._check_lengths(lambda part: self.tokens(part).numel(), "tokens")
        self.calibration_windows()

    def _build(self, key: str) -> torch.Tensor:
        if key not in self._windows:
            if key == "calibration":
                self._windows[key] = self.calibration_windows()
            elif key == "train":
                self._windows[key] = self.finetune_windows()
            elif key == "val":
                self._windows[key] = self.eval_windows(self.validation, self.val_max_tokens)
            else:
                self._windows[key] = self.eval_windows(self.test[key.removeprefix("test/")])
            log.info("%s windows: %s", key, tuple(self._windows[key].shape))
        return self._windows[key]

    def setup(self, stage: str | None = None) -> None:
        roles = {"fit": None, "validate": ["validation"], "test": [r for r in self.roles if r.startswith("test[")]}
        self._check_lengths(lambda part: self.tokens(part).numel(), "tokens", roles.get(stage) if stage else None)
        keys: list[str] = []
        if stage in (None, "fit"):
            keys += ["calibration", "train"]
        if stage in (None, "fit", "validate"):
            keys.append("val")
        if stage in (None, "fit", "test"):  # fit: the dense-vs-compressed summary scores the test sets
            keys += [f"test/{name}" for name in self.test]
        for key in keys:
            self._build(key)

    def _loader(self, key: str, shuffle: bool = False) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed) if shuffle else None
        return DataLoader(WindowDataset(self._build(key)), batch_size=self.batch_size, shuffle=shuffle,
                          generator=generator, num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration")

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> list[DataLoader]:
        """One loader per test corpus, in the order of :attr:`test_names`."""
        return [self._loader(f"test/{name}") for name in self.test]
