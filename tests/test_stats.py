"""Activation statistics: exact Grams through hooks, shared streams, reduction across processes."""

from __future__ import annotations

import pytest
import torch

from compression import ActivationStats, StatsCollector, build_method, collect_stats, eligible_linears, stats_needs


def capture_inputs(model, names, batches):
    seen = {n: [] for n in names}
    modules = dict(model.named_modules())
    handles = [modules[n].register_forward_pre_hook(lambda m, a, n=n: seen[n].append(a[0].detach()))
               for n in names]
    with torch.no_grad():
        for b in batches:
            model(**b)
    for h in handles:
        h.remove()
    return {n: torch.cat([t.reshape(-1, t.shape[-1]) for t in v]).double() for n, v in seen.items()}


def test_gram_and_abs_stats_are_exact(tiny_llama, token_batches):
    """With float64 Gram GEMMs the statistics are exact (float32 activations, float64 products)."""
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches, gemm_dtype=torch.float64)
    inputs = capture_inputs(tiny_llama, names, token_batches)
    for name in names:
        x = inputs[name]
        s = stats[name]
        assert s.count == x.shape[0] == 4 * 2 * 24
        torch.testing.assert_close(s.gram, x.T @ x, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.abs_max, x.abs().amax(0), rtol=0, atol=0)


def test_float32_gram_within_the_gemm_error_bound(tiny_llama, token_batches):
    """Default float32 GEMMs per batch: ``|G - XᵀX| <= K 2⁻²⁴ |X|ᵀ|X|`` entrywise, K = tokens per batch
    (the standard bound of a length-K float32 dot product), and symmetric to the last bit."""
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches)
    inputs = capture_inputs(tiny_llama, names, token_batches)
    k = 2 * 24
    for name in names:
        x, g = inputs[name], stats[name].gram
        assert g.dtype == torch.float64
        err = (g - x.T @ x).abs()
        bound = k * 2.0**-24 * (x.abs().T @ x.abs())
        assert bool((err <= bound).all()), float((err / bound).max())
        assert float(err.max()) > 0  # it really ran in float32
        assert torch.equal(g, g.T)


@pytest.mark.parametrize("needs", [{"gram"}, {"abs"}, set()])
def test_only_the_needed_statistics_are_collected(tiny_llama, token_batches, needs):
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches, needs=needs)
    full = collect_stats(tiny_llama, names, token_batches)
    for name in names:
        s, f = stats[name], full[name]
        assert s.count == f.count == 4 * 2 * 24
        assert (s.gram is not None) == ("gram" in needs) and (s.abs_sum is not None) == ("abs" in needs)
        if "gram" in needs:
            assert torch.equal(s.gram, f.gram)
        if "abs" in needs:
            assert torch.equal(s.abs_sum, f.abs_sum) and torch.equal(s.abs_max, f.abs_max)
    expected = sum(f.nbytes() for f in full.streams.values()) if needs == {"gram", "abs"} else None
    assert expected is None or stats.nbytes() == expected
    if "abs" not in needs:
        with pytest.raises(ValueError, match="asvd"):
            build_method("asvd").check_stats(stats[names[0]], names[0])
        with pytest.raises(ValueError, match="abs"):
            stats[names[0]].abs_mean  # noqa: B018
    if "gram" not in needs:
        with pytest.raises(ValueError, match="Gram"):
            build_method("svd_llm").check_stats(stats[names[0]], names[0])


def test_stats_needs_of_methods():
    assert stats_needs("svd") == frozenset()
    assert stats_needs("svd_llm", "svd_llm_v2") == {"gram"}
    assert stats_needs("asvd", "svd_llm") == {"gram", "abs"}
    with pytest.raises(ValueError, match="unknown statistics"):
        StatsCollector(torch.nn.Linear(2, 2), [""], needs={"hessian"})


def test_stop_early_skips_the_rest_of_the_forward(tiny_llama, token_batches):
    """Ending each forward just before the (unhooked) LM head changes no statistic and never runs the head."""
    names = list(eligible_linears(tiny_llama)[0])
    calls = []
    tiny_llama.lm_head.register_forward_hook(lambda *a: calls.append(1))
    early = collect_stats(tiny_llama, names, token_batches, stop_early=True)
    assert len(calls) == 0
    whole = collect_stats(tiny_llama, names, token_batches, stop_early=False)
    assert len(calls) == len(token_batches)
    for name in names:
        assert torch.equal(early[name].gram, whole[name].gram) and early[name].count == whole[name].count


def test_stop_early_on_experts_that_batches_reach_differently():
    """A mixture of experts whose batches reach different experts (GPT-OSS, tiny, biased router) stops before the
    head with the same statistics as whole forwards; stopping after the first batch's last hooked layer refused
    it ("collect with stop_early=False")."""
    from benchmarks.architectures import batches, prepared, targets

    model = prepared("GPT-OSS")[0]
    names = targets(model)
    calls = []
    model.lm_head.register_forward_hook(lambda *a: calls.append(1))
    early = collect_stats(model, names, batches(), stop_early=True)
    whole = collect_stats(model, names, batches(), stop_early=False)
    assert len(calls) == len(batches())  # the whole forwards only
    reached = [{n for n in names if n in s.owner} for s in (early, whole)]
    assert reached[0] == reached[1] and len(reached[0]) == len(names)
    for name in names:
        assert torch.equal(early[name].gram, whole[name].gram) and early[name].count == whole[name].count
    counts = {early[f"model.layers.1.mlp.experts.down_proj.{e}"].count for e in range(4)}
    assert len(counts) > 1  # the experts saw different numbers of tokens: the routing depends on the input


def test_q_k_v_and_gate_up_share_one_stream(tiny_llama, token_batches):
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches)
    groups = stats.shared_groups()
    assert len(stats.streams) == 2 * 4  # per block: qkv, o, gate/up, down
    for i in range(2):
        attn = f"model.layers.{i}.self_attn."
        mlp = f"model.layers.{i}.mlp."
        assert sorted(groups[attn + "q_proj"]) == sorted(attn + p for p in ("q_proj", "k_proj", "v_proj"))
        assert sorted(groups[mlp + "gate_proj"]) == [mlp + "gate_proj", mlp + "up_proj"]
    assert stats[f"{attn}k_proj"] is stats[f"{attn}q_proj"]


def test_no_sharing_when_disabled(tiny_llama, token_batches):
    names = list(eligible_linears(tiny_llama)[0])
    with StatsCollector(tiny_llama, names, share_inputs=False) as c, torch.no_grad():
        for b in token_batches:
            tiny_llama(**b)
    assert len(c.stats.streams) == len(names) == 14
    torch.testing.assert_close(c.stats["model.layers.0.self_attn.k_proj"].gram,
                               c.stats["model.layers.0.self_attn.q_proj"].gram, rtol=0, atol=0)


def test_reduce_sums_shards_to_the_full_statistics(tiny_llama, token_batches):
    """Two "processes" each see half the batches; an all-reduce of their statistics equals one pass."""
    names = list(eligible_linears(tiny_llama)[0])
    full = collect_stats(tiny_llama, names, token_batches)
    rank0 = collect_stats(tiny_llama, names, token_batches[:1])
    rank1 = collect_stats(tiny_llama, names, token_batches[1:])

    # An all-reduce pairs the tensors both processes pass in the same call order: record rank 1's
    # calls, then let rank 0 combine with them one by one.
    sent: list[torch.Tensor] = []
    rank1.reduce_(lambda t, op: sent.append(t.clone()) or t)
    received = iter(sent)

    def all_reduce(t, op):
        other = next(received)
        return t + other if op == "sum" else torch.maximum(t, other)

    rank0.reduce_(all_reduce)
    assert next(received, None) is None
    for name in names:
        a, f = rank0[name], full[name]
        assert a.count == f.count
        torch.testing.assert_close(a.gram, f.gram, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(a.abs_sum, f.abs_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(a.abs_max, f.abs_max, rtol=0, atol=0)


def test_state_dict_round_trip(tiny_llama, token_batches):
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches)
    back = ActivationStats.from_state_dict(stats.state_dict())
    assert back.owner == stats.owner
    for name in names:
        assert torch.equal(back[name].gram, stats[name].gram) and back[name].count == stats[name].count


def test_non_finite_activation_names_the_layer(tiny_llama, token_batches):
    name = "model.layers.1.self_attn.o_proj"
    tiny_llama.model.layers[1].self_attn.v_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="o_proj"):
        collect_stats(tiny_llama, [name], token_batches)
    # hooks were removed despite the error
    assert not tiny_llama.model.layers[1].self_attn.o_proj._forward_pre_hooks


@pytest.mark.parametrize("needs", [{"gram"}, {"abs"}, {"gram", "abs"}, {"gram", "cross"}])
def test_deferred_finite_check_of_the_sums_names_the_first_bad_layer(needs):
    """What the collector does off a CPU: updates skip the finiteness test; ``check_deferred`` tests the
    accumulated sums of all streams at once (a non-finite input leaves them non-finite for good, through
    later finite updates too) and names the first bad layer in the streams' order."""
    from compression.stats import ChannelStats

    streams = {name: ChannelStats(3, needs=needs) for name in ("a", "b", "c")}
    good, bad = torch.ones(4, 3), torch.tensor([[1.0, float("inf"), 0.0]])
    nan = torch.tensor([[float("nan"), 0.0, 0.0]])

    def update(name, x):
        ref = torch.zeros_like(x) if "cross" in needs else None
        streams[name].update(x, name, ref, defer_check=True)

    for name in streams:
        update(name, good)
    ChannelStats.check_deferred(streams)  # all finite: no error
    update("c", nan)
    update("b", bad)  # no error yet: nothing was tested
    for name in streams:
        update(name, good)  # finite updates after the bad ones do not make the sums finite again
    assert streams["b"].count == 9
    with pytest.raises(FloatingPointError, match="layer 'b'"):
        ChannelStats.check_deferred(streams)  # b comes before c in the streams' order
    with pytest.raises(FloatingPointError, match="layer 'a'"):
        streams["a"].update(bad, "a", torch.zeros_like(bad))  # not deferred: at once


def test_collector_tests_deferred_updates_after_each_batch_and_on_exit(tiny_llama, token_batches, monkeypatch):
    """Off a CPU the collector leaves every update's test to the end of the batch (``run``) or of the context
    (forwards called directly, as the calibration callback does); forced here on the CPU, a NaN entering a
    layer still stops calibration naming it."""
    from compression.collector import StatsCollector
    from compression.stats import ChannelStats

    calls = []
    update = ChannelStats.update

    def deferred(self, x, name="?", reference=None, defer_check=False):
        calls.append(defer_check)
        return update(self, x, name, reference, defer_check=True)

    monkeypatch.setattr(ChannelStats, "update", deferred)
    monkeypatch.setattr(StatsCollector, "_accumulate", _forcing_deferral(StatsCollector._accumulate))
    names = [n for n in eligible_linears(tiny_llama)[0] if ".layers.1." in n]
    tiny_llama.model.layers[1].self_attn.v_proj.weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="o_proj"):
        collect_stats(tiny_llama, names, token_batches)
    assert calls and not any(calls)  # on the CPU the collector itself asks for immediate checks
    assert len(calls) == len(set(names) - {"model.layers.1.self_attn.k_proj", "model.layers.1.self_attn.v_proj",
                                           "model.layers.1.mlp.up_proj"})  # one batch: one update per input

    with pytest.raises(FloatingPointError, match="o_proj"):
        with StatsCollector(tiny_llama, names, needs={"gram"}):
            for batch in token_batches:
                tiny_llama(**batch)  # directly, no run(): the test comes on leaving the context
    assert not tiny_llama.model.layers[1].self_attn.o_proj._forward_pre_hooks


def _forcing_deferral(accumulate):
    def fn(self, name, x):
        self._deferred = True  # what an update off a CPU sets
        return accumulate(self, name, x)
    return fn


def test_unknown_layer_is_an_error(tiny_llama):
    with pytest.raises(KeyError, match="no module named"):
        StatsCollector(tiny_llama, ["model.layers.9.mlp.up_proj"])


def test_stop_early_refuses_input_dependent_routing():
    """Without an output head: a later batch whose hooked calls, as many as the first batch's and ending on the
    same layer, came in another sequence is refused; one that makes fewer calls simply runs whole."""
    class Route(torch.nn.Module):
        def __init__(self, repeat: bool):
            super().__init__()
            self.a, self.b, self.c = (torch.nn.Linear(4, 4) for _ in range(3))
            self.repeat = repeat

        def forward(self, x):
            y = self.a(x)
            if float(x[0, 0]) > 0:
                y = self.b(y)
            elif self.repeat:  # the second batch calls c where the first called b
                y = self.c(y)
            return self.c(y)

    batches = [torch.ones(2, 4), -torch.ones(2, 4)]
    with pytest.raises(RuntimeError, match="another sequence.*stop_early=False"):
        collect_stats(Route(repeat=True), ["a", "b", "c"], batches, stop_early=True)
    model = Route(repeat=False)  # the second batch skips b: fewer calls, nothing cut short
    early = collect_stats(model, ["a", "b", "c"], batches, stop_early=True)
    whole = collect_stats(model, ["a", "b", "c"], batches, stop_early=False)
    assert [early[n].count for n in "abc"] == [whole[n].count for n in "abc"] == [4, 2, 4]


def test_stop_early_counts_a_module_called_repeatedly():
    """A module called several times per forward (an iterated head, as VGGT's camera trunk) is not cut after its
    first call: the statistics equal whole forwards'. (Stopping at the first batch's last *distinct* layer kept
    one iteration of four in the later batches.)"""
    class Iterated(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.trunk = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x):
            y = self.a(x)
            for _ in range(4):
                y = y + self.trunk(y)
            return y

    model, batches = Iterated(), [torch.randn(3, 4, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    early = collect_stats(model, ["a", "trunk"], batches, stop_early=True)
    whole = collect_stats(model, ["a", "trunk"], batches, stop_early=False)
    assert early["trunk"].count == whole["trunk"].count == 3 * 3 * 4
    torch.testing.assert_close(early["trunk"].gram, whole["trunk"].gram, rtol=0, atol=0)


def test_combine_stats_equals_one_pass_over_all_batches(tiny_llama, token_batches):
    """Statistics collected per corpus combine into those of the mix: sums add, maxima take the max."""
    from compression.stats import combine_stats

    names = list(eligible_linears(tiny_llama)[0])
    full = collect_stats(tiny_llama, names, token_batches, gemm_dtype=torch.float64)
    parts = [collect_stats(tiny_llama, names, [b], gemm_dtype=torch.float64) for b in token_batches]
    merged = combine_stats(*parts)
    assert merged.owner == full.owner
    for name in names:
        m, f = merged[name], full[name]
        assert m.count == f.count == sum(p[name].count for p in parts)
        torch.testing.assert_close(m.gram, f.gram, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(m.abs_sum, f.abs_sum, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(m.abs_max, f.abs_max, rtol=0, atol=0)
    assert merged[names[0]].gram.data_ptr() != parts[0][names[0]].gram.data_ptr()  # new tensors
    with pytest.raises(ValueError, match="other layers"):
        combine_stats(parts[0], collect_stats(tiny_llama, names[:1], token_batches[:1]))


def test_upper_block_triangle_equals_the_full_product(monkeypatch):
    """On a CPU the Gram is accumulated in upper column blocks and mirrored on read: the float64 Gram within the
    float32 GEMM bound, exactly symmetric, after each of several updates (each read mirrors what came since)."""
    from compression import stats as stats_module

    width = 40
    monkeypatch.setattr(stats_module, "GRAM_BLOCK", 16)  # 3 blocks of 14, 14, 12 channels
    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: products.append((a.shape[0], b.shape[1])) or mm(a, b, **kw))
    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, width, generator=gen) for _ in range(3)]
    st = stats_module.ChannelStats(width, needs={"gram"})
    for i in range(3):
        st.update(xs[i], "layer")
        g = st.gram
        x = torch.cat([t.reshape(-1, width) for t in xs[:i + 1]]).double()
        err = (g - x.T @ x).abs()
        assert bool((err <= 14 * 2.0**-24 * (x.abs().T @ x.abs())).all())
        assert torch.equal(g, g.T)
    assert products == [(14, 14), (28, 14), (40, 12)] * 3  # block columns: rows 0 .. j + w


@pytest.mark.parametrize("device, blocks", [("cpu", 12), ("meta", 2)])
def test_block_width_depends_on_the_device(monkeypatch, device, blocks):
    """3000 channels: 12 blocks of 250 on a CPU, 2 of 1500 elsewhere (``GRAM_BLOCK_ACCELERATOR``; the meta device
    stands in for a GPU: shapes only)."""
    from compression.stats import ChannelStats

    products = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: products.append(tuple(b.shape)) or mm(a, b, **kw))
    ChannelStats(3000, needs={"gram"}, device=device).update(torch.ones(4, 3000, device=device), "layer",
                                                            defer_check=True)
    assert products == [(4, 3000 // blocks)] * blocks


def test_gram_gemms_run_in_full_float32_whatever_the_process_allows(monkeypatch):
    """``set_float32_matmul_precision("high")`` (Lightning's advice on a tensor-core GPU) lets float32 products run
    in TF32 on CUDA or bfloat16 through oneDNN.  The Gram and cross-Gram GEMMs set both backends to full float32
    while they run and put the process's settings back afterwards, also after an error."""
    from compression.stats import ChannelStats

    backends = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)
    seen = []
    mm = torch.mm
    monkeypatch.setattr(torch, "mm", lambda a, b, **kw: seen.append([b_.fp32_precision for b_ in backends])
                        or mm(a, b, **kw))
    before = [b.fp32_precision for b in backends]
    try:
        for backend, value in zip(backends, ("tf32", "bf16")):
            backend.fp32_precision = value
        st = ChannelStats(6, needs={"gram", "cross"})
        x = torch.randn(5, 6)
        st.update(x, "layer", x + 1)
        assert seen == [["ieee", "ieee"]] * 2  # the Gram and the cross Gram
        assert [b.fp32_precision for b in backends] == ["tf32", "bf16"]
        with pytest.raises(ValueError, match="reference input"):
            st.update(x, "layer", None)
        assert [b.fp32_precision for b in backends] == ["tf32", "bf16"]
        torch.backends.cuda.matmul.fp32_precision = "ieee"  # already full: left alone
        torch.backends.mkldnn.matmul.fp32_precision = "none"  # inherits the generic setting, here unset
        seen.clear()
        ChannelStats(6, needs={"gram"}).update(x, "layer")
        assert seen == [["ieee", "none"]]
    finally:
        for backend, value in zip(backends, before):
            backend.fp32_precision = value
