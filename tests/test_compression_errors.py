"""Bad input stops with a clear error naming the field or layer, and leaves the model untouched."""

from __future__ import annotations

import pytest
import torch

from compression import (
    LowRankLinear,
    Recipe,
    SVDLLMConfig,
    build_method,
    collect_stats,
    compress_,
    eligible_linears,
)
from compression.methods import Method


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [type(m) for m in model.modules()]


def assert_unchanged(model, snap):
    state, types = snap
    assert [type(m) for m in model.modules()] == types
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())
    now = model.state_dict()
    assert now.keys() == state.keys() and all(torch.equal(state[k], now[k]) for k in state)


@pytest.fixture
def stats(tiny_llama, token_batches):
    return collect_stats(tiny_llama, list(eligible_linears(tiny_llama)[0]), token_batches)


@pytest.mark.parametrize("ratio", [0.0, 1.0, -0.2, 1.5])
def test_ratio_outside_open_interval(ratio):
    with pytest.raises(ValueError, match=r"ratio must lie in \(0, 1\).*REMOVED"):
        Recipe("svd", ratio=ratio)


def test_unknown_method_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown compression method 'svdllm'.*svd_llm"):
        Recipe("svdllm")
    with pytest.raises(ValueError, match="valid fields"):
        build_method("asvd", alpah=0.5)
    with pytest.raises(ValueError, match="scaling"):
        build_method("asvd", scaling="rms")


def test_unknown_allocation_and_bad_override():
    with pytest.raises(ValueError, match="unknown allocation"):
        Recipe("svd", allocation="greedyy")
    with pytest.raises(ValueError, match=r"overrides\['q_proj'\].rank must be an integer >= 1"):
        Recipe("svd", overrides={"q_proj": {"rank": 0}})
    with pytest.raises(ValueError, match=r"overrides\['q_proj'\] must be"):
        Recipe("svd", overrides={"q_proj": {"keep": 3}})


@pytest.mark.parametrize("field", ["targets", "exclude", "overrides"])
def test_pattern_matching_nothing(tiny_llama, stats, field):
    snap = snapshot(tiny_llama)
    kwargs = {"targets": ["q_porj"], "exclude": ["q_porj"], "overrides": {"q_porj": {"ratio": 0.5}}}
    with pytest.raises(ValueError, match=r"pattern 'q_porj' matches no eligible.*model.layers.0.self_attn.q_proj"):
        compress_(tiny_llama, Recipe("svd_llm", **{field: kwargs[field]}), stats)
    assert_unchanged(tiny_llama, snap)


@pytest.mark.parametrize("field", ["gram", "abs_sum", "abs_max"])
def test_non_finite_statistics_name_layer_and_field(tiny_llama, stats, field):
    snap = snapshot(tiny_llama)
    getattr(stats["model.layers.1.mlp.down_proj"], field)[3] = float("inf") if field != "gram" else float("nan")
    method = "asvd" if field != "gram" else "svd_llm"
    with pytest.raises(FloatingPointError, match=rf"model.layers.1.mlp.down_proj.*{field}"):
        compress_(tiny_llama, Recipe(method, ratio=0.2), stats)
    assert_unchanged(tiny_llama, snap)


def test_missing_statistics(tiny_llama, stats):
    snap = snapshot(tiny_llama)
    with pytest.raises(ValueError, match="needs calibration statistics: pass stats= or batches="):
        compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), stats=None)
    partial = collect_stats(tiny_llama, ["model.layers.1.mlp.down_proj"], [{"input_ids": torch.zeros(1, 4).long()}])
    q = "model.layers.0.self_attn.q_proj"
    with pytest.raises(ValueError, match=f"has none for 13 of them: {q}, .*forwards never call.*exclude: \\[\"{q}\""):
        compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), stats=partial)
    with pytest.raises(ValueError, match=f"needs calibration statistics for layer '{q}'.*never called this module"
                                         f".*exclude: \\['{q}'\\]"):  # one layer: the per-layer message
        compress_(tiny_llama, Recipe("svd_llm", ratio=0.2, targets=[q, "model.layers.1.mlp.down_proj"]), stats=partial)
    assert_unchanged(tiny_llama, snap)


def test_every_unreached_layer_is_named_with_the_exclude_list_that_leaves_it_dense():
    """One token reaches 2 of the tiny Mixtral's 4 experts a layer: the error names every unreached expert matrix at
    once (not the first only), counts them, and ends with an ``exclude`` list that, pasted, lets the run through."""
    import json

    from benchmarks.architectures import prepared, targets

    model, _, _ = prepared("Mixtral")
    names = targets(model)
    stats = collect_stats(model, names, [{"input_ids": torch.tensor([[5]])}])
    missing = [n for n in names if n not in stats]
    assert len(missing) == 8 and all(".experts." in n for n in missing)  # 2 experts x 2 matrices x 2 layers
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"has none for 8 of them \(8 of them mixture-of-experts experts") as err:
        compress_(model, Recipe("svd_llm", ratio=0.3, targets=names), stats)
    assert_unchanged(model, snap)
    exclude = json.loads(str(err.value).split("exclude: ", 1)[1])
    assert exclude == missing
    report = compress_(model, Recipe("svd_llm", ratio=0.3, targets=names, exclude=exclude), stats)
    assert len(report.layers) == len(names) - 8
    # block by block the same: the first block's four unreached expert matrices, before anything of it changes
    from lightning_modules.specs import CausalLMSpec

    model, _, _ = prepared("Mixtral")
    with pytest.raises(ValueError, match=r"has none for 4 of them \(4 of them mixture-of-experts") as err:
        compress_(model, Recipe("svd_llm", ratio=0.3, targets=names, calibration={"mode": "sequential"}),
                  family=CausalLMSpec(model=model), batches=[{"input_ids": torch.tensor([[5]])}])
    assert json.loads(str(err.value).split("exclude: ", 1)[1]) == missing[:4]
    assert not any(isinstance(m, LowRankLinear) for m in model.modules())


def test_non_finite_weight(tiny_llama, stats):
    tiny_llama.model.layers[0].mlp.up_proj.weight.data[1, 1] = float("nan")
    snap = snapshot(tiny_llama)
    with pytest.raises(FloatingPointError, match="model.layers.0.mlp.up_proj"):
        compress_(tiny_llama, Recipe("svd", ratio=0.2))
    # NaN != NaN, so compare structure only
    assert [type(m) for m in tiny_llama.modules()] == snap[1]


def test_failure_midway_restores_every_layer(tiny_llama, stats, monkeypatch):
    snap = snapshot(tiny_llama)
    original = Method.decompose
    calls = []

    def failing(self, weight, st, rank, name):
        calls.append(name)
        if len(calls) == 9:
            raise FloatingPointError(f"SVD of layer {name!r} produced non-finite values")
        return original(self, weight, st, rank, name)

    monkeypatch.setattr(Method, "decompose", failing)
    with pytest.raises(FloatingPointError, match="non-finite"):
        compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), stats)
    assert len(calls) == 9
    assert_unchanged(tiny_llama, snap)


def test_cholesky_gives_up_with_advice():
    stats_gram = torch.diag(torch.tensor([1.0, 1.0, 1.0, -0.5], dtype=torch.float64))  # indefinite
    from compression import ChannelStats

    s = ChannelStats(4)
    s.gram, s.count = stats_gram, 10
    with pytest.raises(torch.linalg.LinAlgError, match="svd_llm_v2"):
        build_method(SVDLLMConfig(max_jitter=1e-2)).decompose(torch.randn(3, 4), s, 2, "odd")


def test_mha_out_proj_is_never_targeted():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    model.add_module("mha", torch.nn.MultiheadAttention(8, 2))
    eligible, skipped = eligible_linears(model)
    assert list(eligible) == ["0"]
    assert "mha.out_proj" in skipped
    with pytest.raises(ValueError, match="'out_proj' matches no eligible"):
        compress_(model, Recipe("svd", targets=["out_proj"]))


class _ReadsWeight(torch.nn.Module):
    """A parent that multiplies by its child's weight itself (as Mamba's mixers do with dt_proj), reads another
    child's dtype only, and calls a third as a layer."""

    def __init__(self) -> None:
        super().__init__()
        self.dt_proj = torch.nn.Linear(8, 8)
        self.out = torch.nn.Linear(8, 8)
        self.plain = torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x.to(self.out.weight.dtype)
        return self.plain(self.out(x @ self.dt_proj.weight.T))


class _ReadsGrandchild(torch.nn.Module):
    """Ergo's decoder layer: ``branch_dtype = self.self_attn.o_proj.weight.dtype``, two levels down."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = _ReadsWeight()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x):
        return self.proj(self.inner(x.to(self.inner.plain.weight.dtype)))


def test_a_layer_whose_weight_a_module_above_reads_is_never_targeted():
    """Factorized, such a layer has no ``weight``: the model would break at its next forward, for a product and for
    a dtype read alike (``AttributeError: 'LowRankLinear' object has no attribute 'weight'``).  Reads by the parent
    and by any module further up are found; the layer is skipped with the line that reads it, and an explicit
    target naming it says why it matches nothing.  What is compressed then runs."""
    model = torch.nn.Sequential(_ReadsGrandchild())
    eligible, skipped = eligible_linears(model)
    assert list(eligible) == ["0.proj"], list(eligible)
    assert "self.dt_proj.weight.T" in skipped["0.inner.dt_proj"]
    assert "self.out.weight.dtype" in skipped["0.inner.out"]
    assert "self.inner.plain.weight.dtype" in skipped["0.inner.plain"]
    with pytest.raises(ValueError, match="'dt_proj' matches no eligible.*reads its weight directly"):
        compress_(model, Recipe("svd", targets=["dt_proj"]))
    x = torch.randn(3, 8)
    ref = model(x)
    report = compress_(model, Recipe("svd", ratio=0.2))
    assert [r.name for r in report.layers] == ["0.proj"]
    assert model(x).shape == ref.shape


def test_jamba_compresses_without_its_mixers_dt_proj():
    """Jamba's Mamba mixer computes ``dt_proj.weight @ x`` on its CPU path: ``svd`` on the default targets used to
    replace dt_proj and the compressed model failed at its first forward; now dt_proj is reported as not covered
    and the compressed model runs."""
    import transformers

    from lightning_modules.specs import CausalLMSpec

    config = transformers.JambaConfig(
        vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
        attn_layer_period=2, attn_layer_offset=0, mamba_d_state=4, mamba_expand=2, mamba_dt_rank=4,
        use_mamba_kernels=False, pad_token_id=0)
    torch.manual_seed(0)
    model = transformers.JambaForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    report = compress_(model, Recipe("svd", ratio=0.3), family=CausalLMSpec(model=model))
    names = [r.name for r in report.layers]
    assert "model.layers.1.mamba.in_proj" in names and "model.layers.1.mamba.dt_proj" not in names
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()


@pytest.mark.parametrize("exact_tp", [False, True])
def test_bloom_output_projections_are_targets_unless_its_exact_tp_branch_reads_them(exact_tp):
    """BLOOM reads ``dense.weight`` / ``dense_4h_to_h.weight`` only under ``pretraining_tp > 1 and slow_but_exact``.
    Without that flag (its released configs) its output projections are targets and, factorized at full rank, leave
    the logits unchanged; with it they are skipped with the guarded line, and the model still compresses and runs."""
    import copy

    import transformers

    from lightning_modules.specs import CausalLMSpec

    config = transformers.BloomConfig(vocab_size=128, hidden_size=32, n_layer=2, n_head=4, pad_token_id=0,
                                      pretraining_tp=2 if exact_tp else 1, slow_but_exact=exact_tp)
    torch.manual_seed(0)
    model = transformers.BloomForCausalLM(config).eval()
    eligible, skipped = eligible_linears(model)
    dense = ["transformer.h.0.self_attention.dense", "transformer.h.0.mlp.dense_4h_to_h"]
    if exact_tp:
        assert not set(dense) & set(eligible)
        assert "self.dense.weight" in skipped[dense[0]] and "self.dense_4h_to_h.weight" in skipped[dense[1]]
    else:
        assert set(dense) <= set(eligible) and not set(dense) & set(skipped)
    ids = torch.randint(3, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    targets = CausalLMSpec(model=model).default_targets(model)
    full = copy.deepcopy(model)
    ranks = {n: {"rank": min(full.get_submodule(n).weight.shape)} for n in targets}
    report = compress_(full, Recipe("svd", targets=targets, overrides=ranks), family=CausalLMSpec(model=full))
    assert len(report.layers) == len(targets) == (4 if exact_tp else 8)  # 2 of query_key_value/dense/h_to_4h/4h_to_h
    with torch.no_grad():
        err = float((full(input_ids=ids).logits - ref).norm() / ref.norm())
    assert err <= 1e-5, err
