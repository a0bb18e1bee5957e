"""Activation statistics: exact Grams through hooks, shared streams, reduction across processes."""

from __future__ import annotations

import pytest
import torch

from compression import ActivationStats, StatsCollector, collect_stats, eligible_linears


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
    names = list(eligible_linears(tiny_llama)[0])
    stats = collect_stats(tiny_llama, names, token_batches)
    inputs = capture_inputs(tiny_llama, names, token_batches)
    for name in names:
        x = inputs[name]
        s = stats[name]
        assert s.count == x.shape[0] == 4 * 2 * 24
        torch.testing.assert_close(s.gram, x.T @ x, rtol=1e-12, atol=1e-9)
        torch.testing.assert_close(s.abs_mean, x.abs().mean(0), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(s.abs_max, x.abs().amax(0), rtol=0, atol=0)


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


def test_unknown_layer_is_an_error(tiny_llama):
    with pytest.raises(KeyError, match="no module named"):
        StatsCollector(tiny_llama, ["model.layers.9.mlp.up_proj"])
