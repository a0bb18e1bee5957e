"""Decompositions in worker threads (``decompose_threads``, :mod:`compression.parallel`): the same factors
as one matrix at a time, in order, a bounded number in flight, and all-or-nothing on failure."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from compression import LowRankLinear, Recipe, compress_
from compression.methods import Method, build_method
from compression.parallel import ordered_map
from compression.stats import ChannelStats
from lightning_modules.specs import CausalLMSpec
from tests.conftest import QKV, make_tiny_llama

SEQ = {"mode": "sequential", "propagate": "dense", "progress": False}


def _batches(count: int = 3) -> list[dict]:
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 128, (2, 40), generator=g)} for _ in range(count)]


def _factor_weights(model) -> dict[str, torch.Tensor]:
    return {k: v for k, v in model.state_dict().items() if "layers." in k}


@pytest.mark.parametrize("fields", [
    dict(method="svd_llm"),
    dict(method="svd_llm_v2", allocation="v2"),
    dict(method="asvd"),
    dict(method="svd_llm_v2", joint_qkv=True, targets=[*QKV, "o_proj", "down_proj"]),
    dict(method="svd_llm", calibration=SEQ),
], ids=["svd_llm", "svd_llm_v2+v2", "asvd", "joint qkv", "sequential"])
def test_threads_give_the_factors_of_one_at_a_time(fields):
    model = make_tiny_llama().double()
    runs = {}
    for threads in (1, 2, 3):
        m = copy.deepcopy(model)
        report = compress_(m, Recipe(**fields, decompose_threads=threads), family=CausalLMSpec(model=m),
                           batches=_batches())
        runs[threads] = m, report
    ref_model, ref = runs[1]
    assert any(isinstance(x, LowRankLinear) for x in ref_model.modules()) or ref.plan.get("joint_groups")
    want = _factor_weights(ref_model)
    for threads in (2, 3):
        m, report = runs[threads]
        assert report.plan.get("layers") == ref.plan.get("layers")
        assert report.plan.get("joint_groups") == ref.plan.get("joint_groups")
        assert [r.name for r in report.layers] == [r.name for r in ref.layers]  # same order as one at a time
        got = _factor_weights(m)
        assert got.keys() == want.keys()
        for key in want:
            torch.testing.assert_close(got[key], want[key], rtol=0, atol=1e-12, msg=key)


def test_method_factors_in_threads_match_the_loop_on_larger_matrices():
    """Matrices large enough for LAPACK's blocked paths: the factors agree to float64 rounding."""
    g = torch.Generator().manual_seed(0)
    method = build_method("svd_llm_v2")
    items = []
    for rows, cols in ((300, 200), (120, 200), (200, 300), (300, 200)):
        x = torch.randn(4 * cols, cols, dtype=torch.float64, generator=g)
        stats = ChannelStats(cols, needs={"gram"})
        stats.update(x)
        items.append((torch.randn(rows, cols, dtype=torch.float64, generator=g), stats, cols // 3))
    decompose = lambda item: method.decompose(item[0], item[1], item[2], "w")  # noqa: E731
    loop = [decompose(item) for item in items]
    with ordered_map(decompose, items, 2) as results:
        threaded = list(results)
    for a, b in zip(loop, threaded):
        assert a.up.shape == b.up.shape and a.down.shape == b.down.shape
        torch.testing.assert_close(b.up, a.up, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(b.down, a.down, rtol=1e-10, atol=1e-10)
        assert b.truncation_loss == pytest.approx(a.truncation_loss, rel=1e-10)


def test_ordered_map_keeps_order_and_bounds_what_is_in_flight():
    taken, handed, running, peak = [0], [0], [0], [0]
    lock = threading.Lock()

    def items():
        for i in range(12):
            taken[0] += 1
            assert taken[0] - handed[0] <= 3, "more items read than threads"
            yield i

    def fn(i):
        with lock:
            running[0] += 1
            peak[0] = max(peak[0], running[0])
        time.sleep(0.02 * ((7 * i) % 4))  # finish out of order
        with lock:
            running[0] -= 1
        return i * i

    out = []
    with ordered_map(fn, items(), 3) as results:
        for r in results:
            handed[0] += 1
            out.append(r)
    assert out == [i * i for i in range(12)]
    assert 2 <= peak[0] <= 3


def test_ordered_map_raises_the_workers_error_and_leaves_no_thread():
    started = []

    def fn(i):
        started.append(i)
        if i == 2:
            raise torch.linalg.LinAlgError("matrix 2 failed")
        time.sleep(0.01)
        return i

    got = []
    with pytest.raises(torch.linalg.LinAlgError, match="matrix 2"):
        with ordered_map(fn, range(50), 2) as results:
            got.extend(results)
    assert got == [0, 1] and max(started) <= 4  # nothing read past the window
    assert not [t for t in threading.enumerate() if t.name.startswith("decompose")]


def test_failure_in_a_thread_restores_every_layer(monkeypatch):
    model = make_tiny_llama()
    before = copy.deepcopy(model.state_dict())
    original = Method.decompose

    def failing(self, weight, stats, rank, name):
        if name == "model.layers.1.self_attn.o_proj":
            raise torch.linalg.LinAlgError(f"layer {name!r}: injected failure")
        return original(self, weight, stats, rank, name)

    monkeypatch.setattr(Method, "decompose", failing)
    with pytest.raises(torch.linalg.LinAlgError, match="layers.1.self_attn.o_proj"):
        compress_(model, Recipe("svd_llm", ratio=0.4, decompose_threads=2), family=CausalLMSpec(model=model),
                  batches=_batches())
    assert not any(isinstance(x, LowRankLinear) for x in model.modules())
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_bad_thread_count_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="decompose_threads must be an integer >= 1"):
        Recipe("svd_llm", decompose_threads=bad)


def test_thread_count_is_a_run_setting_not_a_model_difference():
    a, b = Recipe("svd_llm", decompose_threads=2), Recipe("svd_llm")
    assert Recipe.from_dict(a.to_dict()).decompose_threads == 2
    assert a.differences(b) == []
