"""2-process DDP on CPU (gloo): sharded calibration equals one process over all the data; LoRA trains in sync.

``tests/ddp_worker.py`` runs the whole Lightning pipeline (calibrate -> compress -> UVLoRA
stages) with ``Trainer(strategy="ddp", devices=2)``, which re-launches the script for rank 1;
each rank saves what it computed.  The reference is the same script with one device.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "ddp_worker.py"

pytestmark = pytest.mark.ddp


def launch(out: Path, devices: int, worker: Path = WORKER, timeout: int = 600, extra: tuple = ()) -> list[dict]:
    """Run ``worker OUT DEVICES [EXTRA...]`` in a clean environment; the per-rank results it saved."""
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for key in ("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run([sys.executable, str(worker), str(out), str(devices), *extra], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(devices)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp")
    return launch(base / "single", 1)[0], launch(base / "ddp", 2)


def merged(state: dict) -> dict[str, torch.Tensor]:
    """``up @ down`` per low-rank layer: the compressed weight, free of SVD sign conventions."""
    return {k[: -len(".down.weight")]: state[k[: -len(".down.weight")] + ".up.weight"].double() @ v.double()
            for k, v in state.items() if k.endswith(".down.weight")}


def assert_same_stats(ref: dict, got: dict, other_rank: dict, tol: float) -> None:
    """Every stream's token count and the statistics the method collected (svd_llm: the Gram; abs-sum and
    abs-max only for ASVD, whose max-reduction tests/test_stats.py checks): ``got`` (rank 0) equals the
    single-process ``ref`` to ``tol`` and equals ``other_rank`` (rank 1) exactly."""
    assert got["owner"] == ref["owner"]
    for key, stream in ref["streams"].items():
        other = got["streams"][key]
        assert other["count"] == stream["count"]
        fields = [f for f in ("gram", "abs_sum", "abs_max") if stream.get(f) is not None]
        assert "gram" in fields and set(fields) == {f for f in ("gram", "abs_sum", "abs_max") if f in other}
        for field in fields:
            torch.testing.assert_close(other[field], stream[field], rtol=tol, atol=tol)
            assert torch.equal(other[field], other_rank["streams"][key][field])


def assert_same_factors(single: dict, rank0: dict, rank1: dict, layers: int) -> None:
    """Merged ``up @ down`` of rank 0 equals one process to 1e-5; both ranks hold identical factors."""
    ref, got = merged(single), merged(rank0)
    assert len(ref) == layers and ref.keys() == got.keys()
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=0, atol=1e-5, msg=name)
        assert rank0[name + ".down.weight"].shape == single[name + ".down.weight"].shape
    for key, value in rank0.items():
        assert torch.equal(value, rank1[key])


def test_sharded_statistics_equal_one_process(runs):
    single, (rank0, rank1) = runs
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    ref = single["stats"]
    assert len(ref["streams"]) == 8  # per block: attn input (q/k/v), o, mlp input (gate/up), down
    assert all(s["count"] == 5 * 2 * 16 for s in ref["streams"].values())  # every token exactly once
    assert_same_stats(ref, rank0["stats"], rank1["stats"], tol=1e-10)


def test_sharded_compression_equals_one_process(runs):
    single, (rank0, rank1) = runs
    assert_same_factors(single["factors"], rank0["factors"], rank1["factors"], layers=14)


def test_lora_stages_train_in_sync(runs):
    _, (rank0, rank1) = runs
    # 8 training windows, batch 2, 2 ranks: 2 steps per epoch; stage 1 = 2 steps, stage 2 = 2 steps
    assert rank0["stages"] == rank1["stages"] == [1.0, 1.0, 2.0, 2.0]
    assert all(torch.isfinite(torch.tensor(r["losses"])).all() for r in (rank0, rank1))
    assert rank0["losses"] != rank1["losses"]  # each rank trained on its own shard ...
    for key, value in rank0["final"].items():  # ... yet gradients were all-reduced: identical weights
        assert torch.equal(value, rank1["final"][key]), key
    before, after = rank0["factors"], rank0["final"]
    assert not any(".lora_" in k for k in after)  # merged and unwrapped at the end of fit
    for side in ("down", "up"):
        key = f"model.layers.0.self_attn.q_proj.{side}.weight"
        assert after[key].shape == before[key].shape and not torch.equal(after[key], before[key])


SEQUENTIAL_WORKER = ROOT / "tests" / "ddp_sequential_worker.py"


@pytest.fixture(scope="module")
def sequential_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_sequential")
    return launch(base / "single", 1, SEQUENTIAL_WORKER)[0], launch(base / "ddp", 2, SEQUENTIAL_WORKER)


def test_sequential_compression_equals_one_process(sequential_runs):
    """Block-sequential with error propagation and v2 ranks (two passes): each rank propagates its own 3 or 2
    calibration batches, each block's statistics are all-reduced before it is compressed; the ranks, the
    factors and the per-block output errors are those of one process over all 5 batches."""
    single, (rank0, rank1) = sequential_runs
    assert rank0["world_size"] == rank1["world_size"] == 2 and single["world_size"] == 1
    assert rank0["ranks"] == rank1["ranks"] == single["ranks"] and len(single["ranks"]) == 14
    assert len(set(single["ranks"].values())) > 1  # v2: heterogeneous ranks, decided from every block's spectra
    assert_same_factors(single["factors"], rank0["factors"], rank1["factors"], layers=14)
    for got, other, ref in zip(rank0["blocks"], rank1["blocks"], single["blocks"]):
        assert got["stats_bytes"] == ref["stats_bytes"]
        assert got["output_error"] == other["output_error"] == pytest.approx(ref["output_error"], rel=1e-6)


@pytest.fixture(scope="module")
def dense_target_runs(tmp_path_factory):
    base = tmp_path_factory.mktemp("ddp_dense_targets")
    extra = ("dense_targets",)
    return (launch(base / "single", 1, SEQUENTIAL_WORKER, extra=extra)[0],
            launch(base / "ddp", 2, SEQUENTIAL_WORKER, extra=extra))


def test_sequential_dense_targets_equal_one_process(dense_target_runs, sequential_runs):
    """calibration.dense_targets under DDP: each rank propagates its batches in both streams, the cross Grams
    are all-reduced with the Grams; factors and per-block errors (also against the dense stream) are those of
    one process, and they differ from the plain sequential run's after block 0 (the streams part there)."""
    single, (rank0, rank1) = dense_target_runs
    assert rank0["ranks"] == rank1["ranks"] == single["ranks"] == sequential_runs[0]["ranks"]
    assert_same_factors(single["factors"], rank0["factors"], rank1["factors"], layers=14)
    for got, other, ref in zip(rank0["blocks"], rank1["blocks"], single["blocks"]):
        assert got["stats_bytes"] == ref["stats_bytes"] > 0
        for key in ("output_error", "dense_error"):
            assert got[key] == other[key] == pytest.approx(ref[key], rel=1e-6)
    plain = sequential_runs[0]["factors"]
    assert all(torch.equal(v, plain[k]) for k, v in single["factors"].items() if k.startswith("model.layers.0."))
    assert any(not torch.equal(v, plain[k]) for k, v in single["factors"].items() if k.startswith("model.layers.1."))
