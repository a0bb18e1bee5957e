"""benchmarks/compression_cost.py's decomposition measurements on a tiny LLaMA: the LAPACK split, the
one-at-a-time vs threaded factors, and the same-shape probe (one at a time / batched / threads)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from compression import LowRankLinear, collect_stats, eligible_linears
from tests.conftest import make_tiny_llama

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


@pytest.fixture
def cost(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))  # the benchmarks import their `common` as a script does
    import compression_cost

    return compression_cost


def _calibrated():
    model = make_tiny_llama()
    targets = list(eligible_linears(model)[0])
    g = torch.Generator().manual_seed(1)
    batches = [{"input_ids": torch.randint(0, 128, (2, 40), generator=g)} for _ in range(3)]
    return model, targets, collect_stats(model, targets, batches, needs={"gram"})


def test_threaded_decomposition_is_timed_split_and_gives_the_same_factors(cost):
    model, targets, stats = _calibrated()
    linalg = {name: getattr(torch.linalg, name) for name in cost.LINALG}
    one, spent, ref = cost.timed_decomposition(model, "svd_llm", stats, targets, 1)
    two, _, got = cost.timed_decomposition(model, "svd_llm", stats, targets, 2)
    assert {name: getattr(torch.linalg, name) for name in cost.LINALG} == linalg  # wrappers removed
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())  # timed on a copy
    assert set(ref) == set(targets) and spent["cholesky_ex"] > 0
    assert spent["eigh"] > 0 and "svd" not in spent  # the default solver: the Gram side's eigendecomposition
    assert one >= sum(spent.values()) and two > 0
    assert cost.factor_difference(got, ref) < 1e-6
    name = targets[0]
    up, down = ref[name]
    assert cost.factor_difference({**got, name: (up[:, :-1], down[:-1])}, ref) == float("inf")  # rank changed
    assert cost.factor_difference({**got, name: (2 * up, down)}, ref) == pytest.approx(1.0, rel=1e-6)


def test_same_shape_probe_compares_loop_batched_and_threads(cost):
    model, targets, stats = _calibrated()
    rows = cost.same_shape_probe(model, stats, targets, 2)
    assert [r[0].split(" of ")[0] for r in rows] == ["SVD", "eigh"]
    for what, count, loop, batched, threads, diff in rows:
        assert count == 2 and min(loop, batched, threads) > 0  # one q_proj per block
        assert diff < 1e-10, what


def test_config_model_run_one_thread_writes_calibration_and_split(cost, tmp_path, monkeypatch):
    """The path the GPU run takes (a model built from a config, random token ids, ``--decompose-threads 1``),
    here on the CPU: the Grams agree with the naive ones and the tables leave the threaded columns out."""
    import re
    import sys

    out = tmp_path / "cost.md"
    out.write_text("# an earlier run\n\n| old | table |\n\n## Reading (notes)\n\n- kept across reruns\n")
    monkeypatch.setattr(sys, "argv", ["compression_cost.py", "--model", "tiny", "--calib-samples", "8", "--seq-len",
                                      "32", "--repeats", "1", "--methods", "svd_llm", "svd_llm_v2",
                                      "--decompose-threads", "1",
                                      "--out", str(out)])
    cost.main()
    text = out.read_text()
    assert "8 x 32 of uniformly random token ids" in text and "torch.float32" in text
    assert "OMP_WAIT_POLICY" in text  # the wait policy it ran under (the tests' passive one here)
    assert "| old | table |" not in text and text.endswith("## Reading (notes)\n\n- kept across reruns\n")
    errors = dict(re.findall(r"(float64|float32) GEMMs (\d\.\de[+-]\d+)", text))
    assert float(errors["float64"]) < 1e-13 and float(errors["float32"]) < 1e-5
    assert "bfloat16" not in text  # a GPU-only variant
    assert "| 1 thread s |" in text and "threads s |" not in text and "Same-shaped" not in text  # one at a time only
    split = [line for line in text.splitlines() if line.startswith("| svd_llm |")]
    assert len(split) == 3 and len(split[0].split("|")) == 9 and len(split[1].split("|")) == 6
    # alternative, default s, alternative s, speed-up, the alternative's s in its call, product difference
    alternatives = [line.split("|") for line in text.splitlines() if line.startswith("| svd_llm") and "| `" in line]
    assert [(row[1].strip(), row[2].strip()) for row in alternatives] == [
        ("svd_llm", "`solver: svd`"), ("svd_llm_v2", "`solver: svd`"), ("svd_llm_v2", "`root: eigh`")]
    for row in alternatives:
        assert len(row) == 9 and float(row[6].split()[0]) > 0 and float(row[7]) < 1e-8
    assert [row[6].split()[1] for row in alternatives] == ["(`svd`)", "(`svd`)", "(`eigh`)"]
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| one Gram per input")
            or line.startswith("| **one Gram per input")]
    assert len(rows) == 2 and all(row[5].strip(" *") == row[6].strip() for row in rows)  # one round: the same ratio


def test_round_ratio_is_the_median_of_each_rounds_ratio(cost):
    """A spike in one round of one variant does not move it (the best-of ratio would move: 4 / 10 -> 4 / 8)."""
    rounds = {"naive": [10.0, 8.0, 12.0], "ours": [4.0, 8.0, 4.8]}  # round ratios 0.4, 1.0, 0.4
    assert cost.round_ratio(rounds, "ours") == 0.4
    assert cost.round_ratio(rounds, "naive") == 1.0


def test_first_grams_keeps_the_leading_layers_within_the_budget(cost):
    grams = {f"l{i}": torch.zeros(4 * (i + 1), 4 * (i + 1), dtype=torch.float64) for i in range(4)}
    sizes = [g.nbytes for g in grams.values()]  # 128, 512, 1152, 2048 bytes
    assert list(cost.first_grams(grams, sum(sizes))) == ["l0", "l1", "l2", "l3"]
    assert list(cost.first_grams(grams, sizes[0] + sizes[1] + sizes[2] - 1)) == ["l0", "l1"]
    assert list(cost.first_grams(grams, 1)) == ["l0"]  # at least one, whatever the budget
    assert cost.first_grams(grams, sizes[0])["l0"] is grams["l0"]  # kept, not copied


def test_calibration_only_run_with_a_capped_gram_check(cost, tmp_path, monkeypatch):
    """``--calibration-only``: the calibration table and nothing else; with the naive Grams kept for the
    comparison capped below the whole set, the line says how many layers were compared."""
    import re
    import sys

    out = tmp_path / "cost.md"
    monkeypatch.setattr(cost, "GRAM_CHECK_BYTES", 3 * 128 * 128 * 8)  # the tiny model's first 3 Grams (n = 128)
    monkeypatch.setattr(sys, "argv", ["compression_cost.py", "--model", "tiny", "--calib-samples", "8", "--seq-len",
                                      "32", "--repeats", "2", "--calibration-only", "--out", str(out)])
    cost.main()
    text = out.read_text()
    assert "## Calibration" in text and "## Decomposition" not in text and "## Split" not in text
    assert "Same-shaped" not in text
    assert "(the first 3 of 28 layers' Grams" in text
    errors = dict(re.findall(r"(float64|float32) GEMMs (\d\.\de[+-]\d+)", text))
    assert float(errors["float64"]) < 1e-13 and float(errors["float32"]) < 1e-5
    rows = [line.split("|") for line in text.splitlines() if "one Gram per input" in line]
    assert [int(row[2]) for row in rows] == [16, 16]  # q/k/v and gate/up share: 4 Grams per block, 4 blocks
