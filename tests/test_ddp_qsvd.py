"""2-process DDP on CPU (gloo): QSVD's gradient allocation, joint truncation and quantization equal one process.

The gradient importance is summed over the ranks' calibration shards, so both processes choose
the single-process ranks; rotations and β are deterministic, so the quantized weights agree too.  With
``calibration.output_fisher`` the Fisher sums are all-reduced first (the importance bases depend on them).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_ddp import launch

WORKER = Path(__file__).resolve().parent / "ddp_qsvd_worker.py"

pytestmark = pytest.mark.ddp


@pytest.mark.parametrize("fisher", [None, 0.25], ids=["plain", "output_fisher"])
def test_qsvd_under_ddp_equals_one_process(tmp_path, fisher):
    extra = () if fisher is None else (str(fisher),)  # output Fisher sums all-reduced before the importance
    single = launch(tmp_path / "single", 1, WORKER, extra=extra)[0]
    rank0, rank1 = launch(tmp_path / "ddp", 2, WORKER, extra=extra)
    assert rank0["world_size"] == 2 and single["world_size"] == 1
    assert rank0["plan"] == rank1["plan"]
    ref, got = single["plan"], rank0["plan"]
    assert got["joint_groups"] == ref["joint_groups"] and got["layers"] == ref["layers"]  # same ranks everywhere
    assert len({s["rank"] for s in got["layers"].values()}) > 1  # and the gradient allocation did choose them
    assert got["quantization"]["beta"] == ref["quantization"]["beta"]
    for key, value in single["state"].items():
        assert torch.equal(rank0["state"][key], rank1["state"][key]), key
        torch.testing.assert_close(rank0["state"][key], value, rtol=0, atol=1e-5, msg=key)
