"""Worker for tests/test_ddp_qsvd.py: QSVD (gradient allocation, joint q/k/v, W8A8) on a tiny float64 LLaMA.

Run as ``python tests/ddp_qsvd_worker.py OUT_DIR DEVICES [FISHER]``; ``FISHER`` (a damping) adds
``calibration.output_fisher`` (its sums all-reduced before the importance); with ``DEVICES=2`` Lightning's DDP
strategy (gloo, CPU) re-launches this script for rank 1.  Every rank writes ``OUT_DIR/rank{r}.pt``
with the plan and the final state dict.
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


def main(out_dir: str, devices: int, fisher: float | None = None) -> None:
    torch.set_num_threads(1)
    recipe = Recipe("svd_llm", ratio=0.3, joint_qkv=True, allocation="gradient",
                    calibration={"progress": False, "gradient_batches": None, "output_fisher": fisher},
                    quantization={"weight_bits": 8, "act_bits": 8, "rotate": True, "beta_search": True,
                                  "clip_grid": 10, "betas": [0.3, 0.5, 0.7], "max_batches": 2})
    trainer = Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=0,
                      logger=False, enable_checkpointing=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, default_root_dir=out_dir)
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama().double()), compression=recipe)
    trainer.fit(module, datamodule=ShardedTokens())
    state = {k: v.detach().clone() for k, v in module.model.state_dict().items()}
    torch.save({"plan": module.plan, "state": state, "world_size": trainer.world_size},
               Path(out_dir) / f"rank{trainer.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]), float(sys.argv[3]) if len(sys.argv) > 3 else None)
