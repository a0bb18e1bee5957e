"""Validate or test a dense model or a compressed checkpoint, as a LightningCLI.

    python evaluate.py test --config configs/llm/svd_llm.yaml --ckpt_path outputs/llm/svd_llm/version_0/compressed.ckpt

A compressed checkpoint carries its compression plan: the factored structure is rebuilt
before the weights load, with no calibration.
"""

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from lightning_modules.cli import EvaluationCLI


def main() -> None:
    EvaluationCLI()


if __name__ == "__main__":
    main()
