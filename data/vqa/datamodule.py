"""ScienceQA-IMG / VizWiz DataModule: calibration, finetuning, validation and test splits for a VLM.

Splits (names of the dataset's own splits; defaults per dataset)::

    dataset     calibration / finetune     validation    test
    scienceqa   train                      val           test      (ScienceQA-IMG: image problems only)
    vizwiz      train                      val           val       (test answers are server-side)

When calibration and finetuning read the same split, its examples are shuffled once with
``seed`` and the first ``calibration_samples`` calibrate while the finetuning examples are
taken from the rest, so no finetuning example was also seen by calibration.  Validation and
test take the first ``*_samples`` examples in the dataset's order (``None``: all of them;
the ScienceQA-IMG test is 2,017 problems).

Batches come from :class:`data.vqa.common.VQACollator` with the model's own processor
(``processor``: the same name or path as the model, e.g. ``llava-hf/llava-1.5-7b-hf`` or
``tiny-llava``).  Calibration batches hold one example each by default, so no padding enters
the activation statistics.  ``root: synthetic`` writes (once, into the cache) and reads a small
set in the official format (:mod:`data.vqa.synthetic`) -- for CPU runs without the real data;
``root: labelled`` the same for real images with questions written from their labels
(Fashion-MNIST and OpenCV digits, :mod:`data.vqa.labelled`), whose VizWiz ``test`` split has answers
and is the default test split.
"""

from __future__ import annotations

import logging
import random
from pathlib import Path
from typing import Any

from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Dataset

from data.vqa.common import VQACollator, VQAExample
from data.vqa.labelled import labelled_root
from data.vqa.scienceqa import ANSWER_FORMATS, read_scienceqa
from data.vqa.synthetic import synthetic_root
from data.vqa.vizwiz import read_vizwiz

log = logging.getLogger(__name__)

READERS = {"scienceqa": read_scienceqa, "vizwiz": read_vizwiz}
DEFAULT_SPLITS = {"scienceqa": {"calibration": "train", "finetune": "train", "validation": "val", "test": "test"},
                  "vizwiz": {"calibration": "train", "finetune": "train", "validation": "val", "test": "val"}}
TEST_NAMES = {"scienceqa": "scienceqa_img", "vizwiz": "vizwiz"}
GENERATED = ("synthetic", "labelled")  # root values that name a set written into the cache


class ExampleDataset(Dataset):
    def __init__(self, examples: list[VQAExample]) -> None:
        self.examples = examples

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int) -> VQAExample:
        return self.examples[i]


class VQADataModule(LightningDataModule):
    """ScienceQA-IMG or VizWiz for a VLM, prompted through the model's processor.

    Args:
        dataset: ``scienceqa`` or ``vizwiz``.
        root: the dataset folder in its official layout (``data/scienceqa``, ``data/vizwiz``; see
            docs/vlm.md), ``synthetic`` for the generated fixture set, or ``labelled`` for real images with
            questions from their labels (:mod:`data.vqa.labelled`).
        processor: name or path of the model whose processor renders prompts and images
            (``tiny-<family>`` of :mod:`models.vlm_tiny`, a hub id or a local folder), or a
            processor object.
        calibration_split / finetune_split / validation_split / test_split: dataset split names
            (``None``: the dataset's default, see the module docstring).
        calibration_samples: examples fed to calibration (and gradient-based rank allocation).
        finetune_samples: finetuning examples (``None``: every one not used for calibration).
        validation_samples / test_samples: first examples of those splits (``None``: all).
        batch_size: finetuning batch size.
        eval_batch_size: validation/test batch size (generation is batched with left padding).
        calibration_batch_size: calibration batch size (1: no padding in the statistics).
        seed: shuffling seed of the calibration/finetuning examples (and of the synthetic set).
        num_workers: dataloader workers.
        scienceqa_format: ScienceQA prompts and targets: ``letter`` (the option's letter, LLaVA's format) or
            ``explained`` (the ScienceQA paper's QCM->EA: ``"<solution> The answer is B."``) or ``scan`` (the
            options checked in order before the answer); see :mod:`data.vqa.scienceqa`.  Only for
            ``dataset: scienceqa``.
    """

    def __init__(
        self,
        dataset: str = "scienceqa",
        root: str = "data/scienceqa",
        processor: Any = "tiny-llava",
        calibration_split: str | None = None,
        finetune_split: str | None = None,
        validation_split: str | None = None,
        test_split: str | None = None,
        calibration_samples: int = 64,
        finetune_samples: int | None = None,
        validation_samples: int | None = 200,
        test_samples: int | None = None,
        batch_size: int = 4,
        eval_batch_size: int = 8,
        calibration_batch_size: int = 1,
        seed: int = 0,
        num_workers: int = 0,
        scienceqa_format: str = "letter",
    ) -> None:
        super().__init__()
        if dataset not in READERS:
            raise ValueError(f"dataset must be one of {sorted(READERS)}, got {dataset!r}")
        if scienceqa_format not in ANSWER_FORMATS:
            raise ValueError(f"scienceqa_format must be one of {ANSWER_FORMATS}, got {scienceqa_format!r}")
        if dataset != "scienceqa" and scienceqa_format != "letter":
            raise ValueError(f"scienceqa_format={scienceqa_format!r} applies to dataset: scienceqa only, "
                             f"got {dataset!r}")
        self.scienceqa_format = scienceqa_format
        if calibration_samples < 1 or min(batch_size, eval_batch_size, calibration_batch_size) < 1:
            raise ValueError("calibration_samples and every batch size must be >= 1")
        for name, value in (("finetune_samples", finetune_samples), ("validation_samples", validation_samples),
                            ("test_samples", test_samples)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 or None (all), got {value}")
        if root not in GENERATED and not Path(root).expanduser().is_dir():  # before any model or processor loads
            raise FileNotFoundError(f"root={root!r} is not a folder; put the {dataset} release there (see docs/vlm.md) "
                                    "or use root: synthetic / labelled")
        defaults = dict(DEFAULT_SPLITS[dataset])
        if root == "labelled":  # its VizWiz-layout test split carries answers
            defaults["test"] = "test"
        self.dataset, self.root = dataset, root
        self.splits = {"calibration": calibration_split or defaults["calibration"],
                       "finetune": finetune_split or defaults["finetune"],
                       "validation": validation_split or defaults["validation"],
                       "test": test_split or defaults["test"]}
        self.calibration_samples, self.finetune_samples = calibration_samples, finetune_samples
        self.validation_samples, self.test_samples = validation_samples, test_samples
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.calibration_batch_size, self.seed, self.num_workers = calibration_batch_size, seed, num_workers
        self._processor_spec = processor
        self._processor = None if isinstance(processor, str) else processor
        self._examples: dict[str, list[VQAExample]] = {}
        self._cache: dict[str, list[VQAExample]] = {}
        self.test_names = [f"{TEST_NAMES[dataset]}_{self.splits['test']}"]  # test/accuracy/scienceqa_img_test

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from models.vlm import load_processor

            self._processor = load_processor(self._processor_spec)
        return self._processor

    def data_root(self) -> Path:
        if self.root == "synthetic":
            return synthetic_root(self.dataset, seed=self.seed)
        if self.root == "labelled":
            return labelled_root(self.dataset, seed=self.seed)
        return Path(self.root).expanduser()

    def _read(self, split: str) -> list[VQAExample]:
        if split not in self._cache:
            kwargs = {"answer_format": self.scienceqa_format} if self.dataset == "scienceqa" else {}
            self._cache[split] = READERS[self.dataset](self.data_root(), split, **kwargs)
            if not self._cache[split]:
                raise ValueError(f"{self.dataset} split {split!r} under {self.data_root()} holds no usable example")
        return self._cache[split]

    def setup(self, stage: str | None = None) -> None:
        """Nothing to prepare eagerly: each split is read the first time a loader needs it (so
        ``evaluate.py test`` never touches the training split)."""

    def _training_roles(self) -> None:
        cal_split, ft_split = self.splits["calibration"], self.splits["finetune"]
        pool = list(self._read(cal_split))
        random.Random(self.seed).shuffle(pool)
        if len(pool) < self.calibration_samples:
            log.warning("%s %s has %d examples, fewer than calibration_samples=%d; using all", self.dataset,
                        cal_split, len(pool), self.calibration_samples)
        self._examples["calibration"] = pool[: self.calibration_samples]
        if ft_split == cal_split:
            finetune = pool[self.calibration_samples:]
        else:
            finetune = list(self._read(ft_split))
            random.Random(self.seed + 1).shuffle(finetune)
        self._examples["finetune"] = finetune[: self.finetune_samples]

    def examples(self, role: str) -> list[VQAExample]:
        """The examples of ``role``: ``calibration``, ``finetune``, ``validation`` or ``test``."""
        if role not in self.splits:
            raise ValueError(f"role must be one of {sorted(self.splits)}, got {role!r}")
        if role not in self._examples:
            if role in ("calibration", "finetune"):
                self._training_roles()
            else:
                limit = self.validation_samples if role == "validation" else self.test_samples
                self._examples[role] = self._read(self.splits[role])[:limit]
            log.info("%s %s: %d examples from split %r", self.dataset, role, len(self._examples[role]),
                     self.splits[role])
        return self._examples[role]

    def _loader(self, role: str, batch_size: int, mode: str, shuffle: bool = False) -> DataLoader:
        data = self.examples(role)
        if not data:
            raise ValueError(f"no {role} examples: the {self.splits[role]!r} split is used up by calibration; "
                             "lower calibration_samples or set finetune_split")
        return DataLoader(ExampleDataset(data), batch_size=batch_size, shuffle=shuffle,
                          collate_fn=VQACollator(self.processor, mode), num_workers=self.num_workers)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader("calibration", self.calibration_batch_size, "train")

    def train_dataloader(self) -> DataLoader:
        return self._loader("finetune", self.batch_size, "train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.eval_batch_size, "eval")

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader("test", self.eval_batch_size, "eval")]


__all__ = ["VQADataModule"]
