"""Calibrate -> compress -> (LoRA stages) -> checkpoint, as a LightningCLI.

    python train.py fit --config configs/llm/svd_llm.yaml
    python train.py fit --config configs/llm/svd_llm.yaml --compression.ratio 0.4
    python train.py fit --help
"""

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning_modules.cli import CompressionCLI


def main() -> None:
    CompressionCLI()


if __name__ == "__main__":
    main()
