"""Lightning test helpers: a tiny token DataModule (random tokens; the real one is data.text) and a CPU trainer."""

from __future__ import annotations

import torch
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from lightning_modules import CausalLMSpec


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


def cpu_trainer(root, callbacks: list, max_steps: int = -1, every: int | None = None) -> Trainer:
    """Deterministic 1-device CPU trainer without validation or logging, atomic checkpoints;
    with ``every``, a checkpoint every ``every`` steps in ``root.parent / "ckpt"`` (file ``step=N.ckpt``)."""
    from lightning_modules.checkpoint_io import AtomicCheckpointIO

    callbacks = list(callbacks)
    if every:
        callbacks.append(ModelCheckpoint(dirpath=root.parent / "ckpt", filename="{step}", save_top_k=-1,
                                         every_n_train_steps=every))
    return Trainer(accelerator="cpu", devices=1, max_steps=max_steps, max_epochs=100, callbacks=callbacks,
                   logger=False, enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                   limit_val_batches=0, enable_checkpointing=bool(every), plugins=[AtomicCheckpointIO()],
                   deterministic=True, default_root_dir=root)


def compress_tiny_llama(root, recipe):
    """The tiny random LLaMA compressed by ``recipe`` through the Lightning stages (no training): the module."""
    from lightning_modules import CompressionModule
    from tests.conftest import make_tiny_llama

    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=recipe)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=0, enable_progress_bar=False, logger=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=root)
    trainer.fit(module, datamodule=TinyTokens())
    return module


class TinyLlamaSpec(CausalLMSpec):
    """``CausalLMSpec`` on the tiny random LLaMA of the tests, for CLI runs (a ``class_path`` in a config).

    Args:
        seed: the random init's seed.
    """

    def __init__(self, seed: int = 0) -> None:
        from tests.conftest import make_tiny_llama

        super().__init__(model=make_tiny_llama(seed=seed))
