"""Worker for tests/test_ddp.py: block-sequential compression (``calibration.mode: sequential``) on a tiny LLaMA.

Run as ``python tests/ddp_sequential_worker.py OUT_DIR DEVICES``.  With ``DEVICES=2`` Lightning's DDP
strategy (gloo, CPU) re-launches this script for rank 1; each rank propagates its own calibration
batches block by block, the statistics of every block are all-reduced before it is compressed, and
every rank writes ``OUT_DIR/rank{r}.pt``: the compressed weights, the plan's ranks and the per-block
records (output errors are reduced too).  ``v2`` allocation: the two-pass scheme (spectra, then factors).
A third argument ``dense_targets`` turns on ``calibration.dense_targets`` (the cross Grams are reduced too).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402

from compression import Recipe  # noqa: E402
from lightning_modules import CausalLMSpec, CompressionModule  # noqa: E402
from tests.conftest import make_tiny_llama  # noqa: E402
from tests.ddp_worker import ShardedTokens  # noqa: E402

CALIBRATION = {"mode": "sequential", "propagate": "compressed", "progress": False}


def main(out_dir: str, devices: int, dense_targets: bool = False) -> None:
    torch.set_num_threads(1)
    recipe = Recipe("svd_llm", ratio=0.3, allocation="v2", calibration={**CALIBRATION, "dense_targets": dense_targets})
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=recipe)
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, limit_val_batches=0,
                      default_root_dir=out_dir)
    trainer.fit(module, datamodule=ShardedTokens())
    sink = {"factors": {k: v.detach().clone() for k, v in module.model.state_dict().items()},
            "ranks": {k: v["rank"] for k, v in module.plan["layers"].items()},
            "blocks": module.report.blocks, "world_size": trainer.world_size}
    torch.save(sink, Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["dense_targets"])
