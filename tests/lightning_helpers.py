"""A tiny token DataModule for Lightning tests (random tokens; the real one is data.text)."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule
from torch.utils.data import DataLoader


def _windows(n: int, seq_len: int, seed: int, vocab: int = 128) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (n, seq_len), generator=g)
    return [{"input_ids": row, "labels": row} for row in ids]


class TinyTokens(LightningDataModule):
    test_names = ["a", "b"]

    def __init__(self, seq_len: int = 16, batch_size: int = 2) -> None:
        super().__init__()
        self.seq_len, self.batch_size = seq_len, batch_size

    def _loader(self, n: int, seed: int, shuffle: bool = False) -> DataLoader:
        return DataLoader(_windows(n, self.seq_len, seed), batch_size=self.batch_size, shuffle=shuffle)

    def calibration_dataloader(self) -> DataLoader:
        return self._loader(8, 1)

    def train_dataloader(self) -> DataLoader:
        return self._loader(8, 2, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader(4, 3)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._loader(4, 4), self._loader(4, 5)]
