"""Worker for tests/test_ddp.py: calibrate, compress and run both UVLoRA stages on a tiny LLaMA.

Run as ``python tests/ddp_worker.py OUT_DIR DEVICES``.  With ``DEVICES=2`` Lightning's DDP
strategy (gloo, CPU) re-launches this script once per extra rank; every rank writes
``OUT_DIR/rank{r}.pt`` with the reduced calibration statistics, the compressed factors
(before LoRA), the per-step losses and stages, and the final weights (after LoRA).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Callback, LightningDataModule, Trainer  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402

from compression import Recipe  # noqa: E402
from lightning_modules import CausalLMSpec, CompressionModule  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from tests.lightning_helpers import _windows  # noqa: E402

CALIBRATION_BATCHES = 5  # odd on purpose: ranks get 3 and 2 batches
RECIPE = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                lora={"steps": [2, 2], "r": 2, "alpha": 4, "dropout": 0.0, "learning_rate": 1e-2})


class ShardedTokens(LightningDataModule):
    """Random tokens; 5 calibration batches of 2 windows, 8 training windows."""

    def calibration_dataloader(self) -> DataLoader:
        return DataLoader(_windows(2 * CALIBRATION_BATCHES, 16, 1), batch_size=2)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(_windows(8, 16, 2), batch_size=2, shuffle=True)


class Capture(Callback):
    """Records what the compression stages produced: the statistics, then the factors."""

    def __init__(self, sink: dict) -> None:
        self.sink = sink

    def on_compression_stage_end(self, trainer, pl_module, stage: str) -> None:
        if stage == "calibration":
            self.sink["stats"] = pl_module.pipeline.stats.state_dict()
        elif stage == "truncation":
            self.sink["factors"] = {k: v.detach().clone() for k, v in pl_module.model.state_dict().items()}


class Steps(Callback):
    """Per step: the loss and the stage UVLoRA logged (listed after UVLoRA)."""

    def __init__(self, sink: dict) -> None:
        self.sink = sink

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.sink.setdefault("losses", []).append(float(outputs["loss"]))
        self.sink.setdefault("stages", []).append(float(trainer.callback_metrics["lora/stage"]))


def run(out_dir: str, devices: int, module, datamodule) -> None:
    """The module's recipe (calibrate -> svd_llm at 0.3 -> UVLoRA 2 + 2 steps); write what each rank saw
    to ``OUT_DIR/rank{r}.pt``."""
    sink: dict = {}
    callbacks = [Capture(sink), Steps(sink)]
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      max_epochs=100, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, default_root_dir=out_dir)
    trainer.fit(module, datamodule=datamodule)
    sink["final"] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    sink["world_size"] = trainer.world_size
    torch.save(sink, Path(out_dir) / f"rank{trainer.global_rank}.pt")


def main(out_dir: str, devices: int) -> None:
    torch.set_num_threads(1)
    run(out_dir, devices, CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=RECIPE,
                                            learning_rate=1e-2), ShardedTokens())


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
