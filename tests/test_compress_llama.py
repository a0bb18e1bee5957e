"""compress_ end to end on a tiny random-init LLaMA with grouped-query attention."""

from __future__ import annotations

import pytest
import torch

from compression import (
    LowRankLinear,
    Recipe,
    apply_plan,
    collect_stats,
    compress_,
    eligible_linears,
    load_plan,
    merge_lowrank_,
    rank_for_ratio,
    save_plan,
)
from tests.conftest import make_tiny_llama

METHODS = ["svd", "asvd", "svd_llm", "svd_llm_v2"]


def calibrate(model, batches):
    return collect_stats(model, list(eligible_linears(model)[0]), batches)


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


def count_params(model) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("allocation", ["uniform", "v2"])
@pytest.mark.parametrize("method", METHODS)
def test_each_method_runs_and_counts_exactly(tiny_llama, token_batches, method, allocation):
    stats = calibrate(tiny_llama, token_batches)
    before = count_params(tiny_llama)
    report = compress_(tiny_llama, Recipe(method=method, ratio=0.3, allocation=allocation), stats)
    assert torch.isfinite(logits(tiny_llama, token_batches[0])).all()
    after = count_params(tiny_llama)
    assert report.model_params_before == before
    assert report.model_params_after == after
    assert before - after == sum(r.params_before - r.params_after for r in report.layers)
    assert len(report.layers) == 14  # 7 linears x 2 blocks; the tied lm_head is skipped
    assert report.skipped == {"lm_head": "weight tied to an input embedding",  # and every matrix not covered:
                              "model.embed_tokens.weight": "input embedding (a table lookup, not a product) "
                                                           "[8,192 parameters]"}
    assert report.uncovered_params == 8192
    # the floor in the rank formula removes at least what was asked, never far more
    assert 0.3 <= report.params_ratio < 0.36
    for r in report.layers:
        layer = tiny_llama.get_submodule(r.name)
        assert isinstance(layer, LowRankLinear) and layer.rank == r.rank
        assert r.params_after == layer.num_parameters()
        if allocation == "uniform":
            assert r.rank == rank_for_ratio(r.out_features, r.in_features, 0.3)


def test_gqa_shapes_are_respected(tiny_llama, token_batches):
    report = compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), calibrate(tiny_llama, token_batches))
    by_name = {r.name: r for r in report.layers}
    assert by_name["model.layers.0.self_attn.q_proj"].shape == (64, 64)
    assert by_name["model.layers.0.self_attn.k_proj"].shape == (32, 64)  # 2 KV heads x 16
    assert by_name["model.layers.0.self_attn.k_proj"].rank == rank_for_ratio(32, 64, 0.2) == 17


def test_v2_allocation_keeps_group_mean_and_varies(tiny_llama, token_batches):
    # give one block a near-low-rank q_proj so the allocation must treat the two blocks differently
    q0 = tiny_llama.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        q0.weight.copy_(q0.weight[:, :4] @ torch.randn(4, 64) * 0.3 + 1e-3 * q0.weight)
    stats = calibrate(tiny_llama, token_batches)
    report = compress_(tiny_llama, Recipe("svd_llm", ratio=0.4, allocation="v2"), stats)
    ratios = {r.name: r.ratio_assigned for r in report.layers}
    for kind in ("self_attn.q_proj", "self_attn.k_proj", "mlp.down_proj"):
        pair = [ratios[f"model.layers.{i}.{kind}"] for i in range(2)]
        assert sum(pair) / 2 == pytest.approx(0.4, abs=1e-12)
    q_ratios = [ratios[f"model.layers.{i}.self_attn.q_proj"] for i in range(2)]
    assert q_ratios[0] > q_ratios[1] + 0.05  # the easy (low-rank) matrix gives up more


def test_overrides_excludes_and_targets(tiny_llama, token_batches):
    stats = calibrate(tiny_llama, token_batches)
    config = Recipe(
        "svd_llm", ratio=0.2, targets=["self_attn.*", "mlp.down_proj"], exclude=["model.layers.1.self_attn.o_proj"],
        overrides={"model.layers.0.self_attn.q_proj": {"rank": 5}, "k_proj": {"ratio": 0.5}},
    )
    report = compress_(tiny_llama, config, stats)
    by_name = {r.name: r for r in report.layers}
    assert "model.layers.1.self_attn.o_proj" not in by_name and "model.layers.0.mlp.gate_proj" not in by_name
    assert len(by_name) == 4 + 3 + 2
    assert by_name["model.layers.0.self_attn.q_proj"].rank == 5
    assert by_name["model.layers.1.self_attn.k_proj"].rank == rank_for_ratio(32, 64, 0.5)


def test_repeating_compression_changes_nothing(tiny_llama, token_batches):
    stats = calibrate(tiny_llama, token_batches)
    compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), stats)
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="no eligible"):  # nothing left but the factors, which are skipped
        compress_(tiny_llama, Recipe("svd_llm", ratio=0.2, targets=["q_proj"]), stats)
    assert all(torch.equal(state[k], v) for k, v in tiny_llama.state_dict().items())


def test_plan_rebuilds_structure_and_loads_weights(tiny_llama, token_batches, tmp_path):
    stats = calibrate(tiny_llama, token_batches)
    report = compress_(tiny_llama, Recipe("svd_llm_v2", ratio=0.4, allocation="v2"), stats)
    save_plan(report.plan, tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan == report.plan
    fresh = make_tiny_llama(seed=123)
    changed = apply_plan(fresh, plan)
    assert len(changed) == 14
    assert {k: v.shape for k, v in fresh.state_dict().items()} == {
        k: v.shape for k, v in tiny_llama.state_dict().items()}
    fresh.load_state_dict(tiny_llama.state_dict(), strict=True)
    assert torch.equal(logits(fresh, token_batches[0]), logits(tiny_llama, token_batches[0]))
    assert apply_plan(fresh, plan) == []  # applying again changes nothing


def test_merge_back_to_dense_matches(tiny_llama, token_batches):
    compress_(tiny_llama, Recipe("svd_llm", ratio=0.2), calibrate(tiny_llama, token_batches))
    ref = logits(tiny_llama, token_batches[0])
    merged = merge_lowrank_(tiny_llama)
    assert len(merged) == 14
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())
    torch.testing.assert_close(logits(tiny_llama, token_batches[0]), ref, rtol=1e-4, atol=1e-5)


def test_whitening_beats_plain_svd_on_calibration_outputs(tiny_llama, token_batches):
    """Per layer, the whitened truncation loses less calibration output energy than plain SVD."""
    stats = calibrate(tiny_llama, token_batches)
    losses = {}
    for method in ("svd", "svd_llm"):
        model = make_tiny_llama()
        report = compress_(model, Recipe(method, ratio=0.4), stats)
        # output error of each layer on the calibration Gram: ‖(W - W') L‖_F
        errs = []
        for r in report.layers:
            w = tiny_llama.get_submodule(r.name).weight.detach().double()
            w_hat = model.get_submodule(r.name).to_linear().weight.detach().double()
            errs.append(float(torch.linalg.matrix_norm((w - w_hat) @ torch.linalg.cholesky(
                stats[r.name].gram + 1e-9 * torch.eye(w.shape[1], dtype=torch.float64)))))
        losses[method] = errs
    assert all(a <= b * (1 + 1e-6) for a, b in zip(losses["svd_llm"], losses["svd"]))


def test_allocate_overrides_first_match_then_allocation(tiny_llama, token_batches):
    from compression import allocate

    stats = calibrate(tiny_llama, token_batches)
    q0 = "model.layers.0.self_attn.q_proj"
    recipe = Recipe("svd_llm", ratio=0.2, allocation="v2", overrides={q0: {"rank": 3}, "q_proj": {"rank": 9}})
    decided = allocate(tiny_llama, recipe, stats)
    assert decided.ranks[q0] == 3 and decided.ranks["model.layers.1.self_attn.q_proj"] == 9
    assert q0 not in decided.spectra and "model.layers.0.mlp.up_proj" in decided.spectra
    assert not any(isinstance(m, LowRankLinear) for m in tiny_llama.modules())  # allocation never mutates
    report = compress_(tiny_llama, recipe, stats)
    assert {r.name: r.rank for r in report.layers} == decided.ranks
    with pytest.raises(ValueError, match="pattern 'model.nope' matches no eligible"):
        allocate(make_tiny_llama(), Recipe("svd", overrides={"model.nope": {"rank": 2}}))
