"""2-process DDP on CPU (gloo) for VGGT: sharded multi-view calibration equals one process; U/V LoRA
with the multi-task loss trains in sync.

``tests/vggt_ddp_worker.py`` runs calibrate -> compress -> UVLoRA stages on a tiny VGGT with
synthetic 2-view scenes, once with one device (the reference) and once with ``strategy="ddp"``.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.test_ddp import assert_same_factors, assert_same_stats, launch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "vggt_ddp_worker.py"

pytestmark = pytest.mark.ddp


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("vggt_ddp")
    return launch(base / "single", 1, WORKER, 900)[0], launch(base / "ddp", 2, WORKER, 900)


def test_sharded_multiview_statistics_equal_one_process(runs):
    single, (rank0, rank1) = runs
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    ref, got = single["stats"], rank0["stats"]
    assert got["owner"] == ref["owner"] and len(ref["owner"]) == 44
    # 3 scenes x 2 views x (5 special + 4 patch) tokens through every frame / global block layer
    frame = ref["owner"]["aggregator.frame_blocks.0.attn.qkv"]
    assert ref["streams"][frame]["count"] == got["streams"][frame]["count"] == 3 * 2 * 9
    assert_same_stats(ref, got, rank1["stats"], tol=1e-9)


def test_sharded_compression_equals_one_process(runs):
    single, (rank0, rank1) = runs
    assert_same_factors(single["factors"], rank0["factors"], rank1["factors"], layers=44)


def test_vggt_lora_stages_train_in_sync(runs):
    _, (rank0, rank1) = runs
    assert rank0["stages"] == rank1["stages"] == [1.0, 1.0, 2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (rank0, rank1))
    assert rank0["losses"] != rank1["losses"]  # each rank saw its own scenes ...
    for key, value in rank0["final"].items():  # ... and the all-reduced gradients kept the weights identical
        assert torch.equal(value, rank1["final"][key]), key
    before, after = rank0["factors"], rank0["final"]
    assert not any(".lora_" in k for k in after)
    for side in ("down", "up"):
        key = f"aggregator.global_blocks.1.attn.qkv.{side}.weight"
        assert after[key].shape == before[key].shape and not torch.equal(after[key], before[key])
