"""Worker for tests/test_vggt_compression_ddp.py: calibrate, compress and run both UVLoRA stages on a tiny VGGT.

Run as ``python tests/vggt_ddp_worker.py OUT_DIR DEVICES`` (the pipeline: ``tests.ddp_worker.run``).
With ``DEVICES=2`` Lightning's DDP strategy (gloo, CPU) re-launches this script for rank 1; every
rank writes ``OUT_DIR/rank{r}.pt`` with the reduced calibration statistics, the compressed factors
(before LoRA), the per-step multi-task losses and UVLoRA stages, and the final weights (after
LoRA, merged).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from data.multiview.datamodule import MultiViewDataModule  # noqa: E402
from lightning_modules import CompressionModule, VGGTSpec  # noqa: E402
from tests.ddp_worker import RECIPE, run  # noqa: E402

CALIBRATION_SCENES = 3  # batch 1: ranks get 2 and 1 calibration batches
TRAIN_SCENES = 8  # batch 1, 2 ranks: 4 steps per epoch


def main(out_dir: str, devices: int) -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    spec = VGGTSpec(config_overrides={"frames_chunk_size": None}, count_flops=False)
    data = MultiViewDataModule(num_views=2, image_size=(28, 28), train_scenes=TRAIN_SCENES, val_scenes=0,
                               test_scenes=0, calibration_scenes=CALIBRATION_SCENES, seed=0, batch_size=1)
    run(out_dir, devices, CompressionModule(spec, compression=RECIPE, learning_rate=1e-2), data)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
