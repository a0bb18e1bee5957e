"""Several VQA sets in one run: e.g. the ScienceQA and VizWiz layouts trained, calibrated and scored together.

One :class:`~data.vqa.datamodule.VQADataModule` per dataset does the reading and splitting (its
``*_samples`` limits apply per dataset); this module combines their loaders:

- calibration: the datasets' calibration examples alternating (a, b, a, b, ...);
- training: every dataset's finetuning examples, shuffled together (batches mix the layouts);
- validation: one loader whose batches never mix datasets (an evaluation batch has one task);
- test: one loader per dataset, named ``scienceqa_img_test``, ``vizwiz_test``, ...

All datasets are rendered by one processor object, loaded once.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader, Sampler

from data.vqa.common import VQACollator
from data.vqa.datamodule import ExampleDataset, VQADataModule


class GroupedBatches(Sampler[list[int]]):
    """Consecutive batches of at most ``batch_size`` indices that never cross a group boundary.

    ``lengths``: the sizes of the groups laid end to end in the dataset (``[3, 2]``: indices 0-2, 3-4).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int) -> None:
        self.lengths, self.batch_size = list(lengths), batch_size

    def __iter__(self) -> Iterator[list[int]]:
        start = 0
        for n in self.lengths:
            for i in range(start, start + n, self.batch_size):
                yield list(range(i, min(i + self.batch_size, start + n)))
            start += n

    def __len__(self) -> int:
        return sum(-(-n // self.batch_size) for n in self.lengths)


class VQAMixDataModule(LightningDataModule):
    """ScienceQA-IMG / VizWiz sets combined (module docstring).

    Args:
        datasets: dataset names (``scienceqa``, ``vizwiz``), each read by its own ``VQADataModule``.
        root: one root for every dataset (``labelled``, ``synthetic``) or one per dataset (real data folders).
        processor: name or path of the model whose processor renders prompts and images, or a processor.
        test_split: the split every dataset is tested on (``None``: each dataset's default).
        calibration_samples / finetune_samples / validation_samples / test_samples: per dataset
            (see ``VQADataModule``).
        batch_size / eval_batch_size / calibration_batch_size: loader batch sizes.
        seed: split and shuffling seed (and the seed of generated sets).
        num_workers: dataloader workers.
        scienceqa_format: the ScienceQA set's answer format, ``letter``, ``explained`` or ``scan`` (see
            ``VQADataModule``).
    """

    def __init__(self, datasets: Sequence[str] = ("scienceqa", "vizwiz"), root: str | Sequence[str] = "labelled",
                 processor: Any = "tiny-llava", test_split: str | None = None, calibration_samples: int = 32,
                 finetune_samples: int | None = None,
                 validation_samples: int | None = 50, test_samples: int | None = None, batch_size: int = 4,
                 eval_batch_size: int = 8, calibration_batch_size: int = 1, seed: int = 0,
                 num_workers: int = 0, scienceqa_format: str = "letter") -> None:
        super().__init__()
        datasets = list(datasets)
        if not datasets or len(set(datasets)) != len(datasets):
            raise ValueError(f"datasets must be a non-empty list without repeats, got {datasets}")
        if scienceqa_format != "letter" and "scienceqa" not in datasets:
            raise ValueError(f"scienceqa_format={scienceqa_format!r} needs scienceqa among the datasets, "
                             f"got {datasets}")
        roots = [root] * len(datasets) if isinstance(root, str) else list(root)
        if len(roots) != len(datasets):
            raise ValueError(f"give one root, or one per dataset ({len(datasets)}), got {len(roots)}")
        self._processor_spec = processor
        self._processor = None if isinstance(processor, str) else processor
        self.parts = [VQADataModule(dataset=d, root=r, processor=processor, test_split=test_split,
                                    calibration_samples=calibration_samples,
                                    finetune_samples=finetune_samples, validation_samples=validation_samples,
                                    test_samples=test_samples, batch_size=batch_size, eval_batch_size=eval_batch_size,
                                    calibration_batch_size=calibration_batch_size, seed=seed, num_workers=num_workers,
                                    scienceqa_format=scienceqa_format if d == "scienceqa" else "letter")
                      for d, r in zip(datasets, roots)]
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.calibration_batch_size, self.seed, self.num_workers = calibration_batch_size, seed, num_workers
        self.test_names = [name for part in self.parts for name in part.test_names]

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from models.vlm import load_processor

            self._processor = load_processor(self._processor_spec)
        for part in self.parts:  # one processor object for every dataset
            part._processor = self._processor
        return self._processor

    def setup(self, stage: str | None = None) -> None:
        """Splits are read lazily by each part."""

    def calibration_dataloader(self) -> DataLoader:
        columns = [part.examples("calibration") for part in self.parts]
        mixed = [e for row in itertools.zip_longest(*columns) for e in row if e is not None]
        return DataLoader(ExampleDataset(mixed), batch_size=self.calibration_batch_size,
                          collate_fn=VQACollator(self.processor, "train"), num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        examples = [e for part in self.parts for e in part.examples("finetune")]
        if not examples:
            raise ValueError("no finetuning examples: calibration used up every training split")
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(ExampleDataset(examples), batch_size=self.batch_size, shuffle=True, generator=g,
                          collate_fn=VQACollator(self.processor, "train"), num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        groups = [part.examples("validation") for part in self.parts]
        return DataLoader(ExampleDataset([e for g in groups for e in g]),
                          batch_sampler=GroupedBatches([len(g) for g in groups], self.eval_batch_size),
                          collate_fn=VQACollator(self.processor, "eval"), num_workers=self.num_workers)

    def test_dataloader(self) -> list[DataLoader]:
        self.processor  # noqa: B018 -- share the processor before the parts build their loaders
        return [loader for part in self.parts for loader in part.test_dataloader()]


__all__ = ["GroupedBatches", "VQAMixDataModule"]
