"""One whitening factor per input stream during the truncation pass (``compression.stats.shared_reads``): q/k/v and
gate/up read one Gram, so its Cholesky factor (``svd_llm``) or eigendecomposition (``svd_llm_v2``) is computed once
for them -- with factors identical to decomposing each layer on its own -- and let go after the last reader."""

from __future__ import annotations

import copy
import threading
import time

import pytest
import torch

from compression import LowRankLinear, Recipe, collect_stats, compress_, whitening
from compression.methods import build_method
from compression.stats import ChannelStats, shared_reads
from lightning_modules.specs import CausalLMSpec
from tests.conftest import make_tiny_llama

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _batches() -> list[dict]:
    g = torch.Generator().manual_seed(3)
    return [{"input_ids": torch.randint(3, 128, (2, 48), generator=g)} for _ in range(3)]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("method, args", [("svd_llm", {}), ("svd_llm", {"shrinkage": 0.1}),
                                          ("svd_llm_v2", {}), ("svd_llm_v2", {"shrinkage": 0.1})])
def test_one_whitening_per_stream_and_the_factors_of_each_layer_alone(monkeypatch, method, args, threads):
    model = make_tiny_llama().double()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]
    stats = collect_stats(model, names, _batches(), forward=CausalLMSpec(model=model).calibration_forward)
    assert len(stats.streams) == 4 * 2  # q/k/v, o, gate/up, down in each of 2 blocks
    computed = []
    scaled = whitening._scaled
    monkeypatch.setattr(whitening, "_scaled", lambda gram, name, s: computed.append(name) or scaled(gram, name, s))
    m = copy.deepcopy(model)
    compress_(m, Recipe(method, ratio=0.3, targets=TARGETS, method_args=args, decompose_threads=threads), stats)
    assert len(computed) == len(stats.streams)  # 8 whitening factors for 14 layers
    assert all(s._shared is None for s in stats.streams.values())  # nothing kept after the pass

    computed.clear()
    alone = build_method(method, **args)
    for name in names:
        layer = m.get_submodule(name)
        assert isinstance(layer, LowRankLinear)
        f = alone.decompose(model.get_submodule(name).weight, stats[name], layer.rank, name)
        assert torch.equal(layer.up.weight, f.up) and torch.equal(layer.down.weight, f.down), name
    assert len(computed) == len(names)  # outside a pass every layer computes its own


def _stream() -> ChannelStats:
    st = ChannelStats(4, needs={"gram"})
    st.update(torch.randn(16, 4))
    return st


def test_kept_for_the_announced_readers_then_let_go():
    st, other = _stream(), _stream()
    calls = []

    def compute():
        calls.append(1)
        return torch.ones(2)

    with shared_reads([st, st, st, other]):
        assert other._shared is None  # a stream read once keeps nothing
        first = st.derived("k", compute)
        assert st.derived("k", compute) is first and len(calls) == 1
        assert st.derived("k", compute) is first and len(calls) == 1  # the third and last announced reader
        assert st._shared.values == {}  # let go after it
        st.derived("k", compute)  # a reader beyond the count computes afresh
        assert len(calls) == 2
    assert st._shared is None
    st.derived("k", compute)
    st.derived("k", compute)
    assert len(calls) == 4  # outside a pass: every call computes


def test_distinct_keys_are_distinct_values():
    st = _stream()
    with shared_reads([st, st]):
        assert st.derived(("eigh", 0.0), lambda: 1) == 1
        assert st.derived(("eigh", 0.1), lambda: 2) == 2


def test_concurrent_readers_compute_once():
    st = _stream()
    calls, got = [], []

    def compute():
        calls.append(threading.get_ident())
        time.sleep(0.2)  # the second reader arrives while the first computes
        return object()

    with shared_reads([st, st]):
        threads = [threading.Thread(target=lambda: got.append(st.derived("k", compute))) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(calls) == 1 and len(got) == 2 and got[0] is got[1]


def test_a_failed_computation_is_raised_and_not_kept():
    st = _stream()

    def fail():
        raise torch.linalg.LinAlgError("not positive definite")

    with shared_reads([st, st]):
        with pytest.raises(torch.linalg.LinAlgError, match="not positive definite"):
            st.derived("k", fail)
        assert st.derived("k", lambda: 5) == 5


def test_nested_passes_over_the_same_statistics_are_refused():
    st, fresh = _stream(), _stream()
    with shared_reads([st, st]):
        outer = st._shared
        with pytest.raises(RuntimeError, match="already in a pass"):
            with shared_reads([fresh, fresh, st, st]):
                pass
        assert st._shared is outer and fresh._shared is None  # neither pass's state is left behind
    assert st._shared is None


def test_gradient_importance_shares_the_whitening_too(monkeypatch):
    import contextlib
    import importlib

    gradient_allocation = importlib.import_module("compression.gradient_allocation")  # the package's name is a function

    model = make_tiny_llama().double()
    names = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n.split(".")[-1] in TARGETS]
    batches = _batches()
    stats = collect_stats(model, names, batches, forward=CausalLMSpec(model=model).calibration_forward)

    def loss(m, batch):
        return m(**batch, labels=batch["input_ids"]).loss

    computed = []
    scaled = whitening._scaled
    monkeypatch.setattr(whitening, "_scaled", lambda gram, name, s: computed.append(name) or scaled(gram, name, s))
    shared = gradient_allocation.gradient_importance(model, names, batches[:1], loss, "svd_llm", stats)
    assert len(computed) == len(stats.streams) == 8
    computed.clear()
    monkeypatch.setattr(gradient_allocation, "shared_reads", lambda readers: contextlib.nullcontext())
    alone = gradient_allocation.gradient_importance(model, names, batches[:1], loss, "svd_llm", stats)
    assert len(computed) == len(names) == 14
    assert shared.keys() == alone.keys() and all(torch.equal(shared[k], alone[k]) for k in alone)
