"""Worker for tests/test_vggt_compression_ddp.py: calibrate, compress and run both UVLoRA stages on a tiny VGGT.

Run as ``python tests/vggt_ddp_worker.py OUT_DIR DEVICES``.  With ``DEVICES=2`` Lightning's DDP
strategy (gloo, CPU) re-launches this script for rank 1; every rank writes ``OUT_DIR/rank{r}.pt``
with the reduced calibration statistics, the compressed factors (before LoRA), the per-step
multi-task losses and UVLoRA stages, and the final weights (after LoRA, merged).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from callbacks import SVDTruncation, UVLoRA, WhiteningCollection  # noqa: E402
from data.multiview.datamodule import MultiViewDataModule  # noqa: E402
from lightning_modules import CompressionModule, VGGTSpec  # noqa: E402
from tests.ddp_worker import Capture, Steps  # noqa: E402

CALIBRATION_SCENES = 3  # batch 1: ranks get 2 and 1 calibration batches
TRAIN_SCENES = 8  # batch 1, 2 ranks: 4 steps per epoch


def main(out_dir: str, devices: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    sink: dict = {}
    callbacks = [WhiteningCollection(progress=False), Capture("stats", sink),
                 SVDTruncation(method="svd_llm", ratio=0.3), Capture("factors", sink),
                 UVLoRA(steps=[2, 2], r=2, alpha=4, dropout=0.0, learning_rate=1e-2), Steps(sink)]
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                      max_epochs=100, callbacks=callbacks, logger=False, enable_checkpointing=False,
                      enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                      limit_val_batches=0, default_root_dir=out_dir)
    spec = VGGTSpec(config_overrides={"frames_chunk_size": None}, count_flops=False)
    module = CompressionModule(spec, learning_rate=1e-2)
    data = MultiViewDataModule(num_views=2, image_size=(28, 28), train_scenes=TRAIN_SCENES, val_scenes=0,
                               test_scenes=0, calibration_scenes=CALIBRATION_SCENES, seed=0, batch_size=1)
    trainer.fit(module, datamodule=data)
    sink["final"] = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    sink["world_size"] = trainer.world_size
    torch.save(sink, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
