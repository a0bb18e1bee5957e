"""Joint QKV factorization: exactness at full rank, parameter accounting, plans, latent memo."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch

from compression import (
    apply_plan,
    collect_stats,
    eligible_linears,
    find_joint_groups,
    joint_rank_for_ratio,
    load_plan,
    save_plan,
)
from compression.joint import JointLatent, JointProjection, decompose_joint
from compression.methods import build_method
from lightning_modules.specs import CausalLMSpec
from models.layouts import layout_of
from tests.conftest import compress_joint, make_tiny_llama


def calibrate(model, batches):
    return collect_stats(model, list(eligible_linears(model)[0]), batches)


def qkv_outputs(model, x):
    attn = model.model.layers[0].self_attn
    h = model.model.layers[0].input_layernorm(model.model.embed_tokens(x))
    return [attn.q_proj(h), attn.k_proj(h), attn.v_proj(h)]


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "svd_llm_v2"])
def test_full_rank_reproduces_q_k_v(method, token_batches):
    model = make_tiny_llama().double()
    dense = copy.deepcopy(model)
    batches = [{"input_ids": b["input_ids"].repeat(3, 1)} for b in token_batches]  # > 64 tokens: PD Gram
    stats = calibrate(model, batches)
    groups = find_joint_groups(model, layout_of(model))
    assert list(groups) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    compress_joint(model, method, stats, overrides={g: {"rank": 64} for g in groups})
    x = token_batches[0]["input_ids"]
    with torch.no_grad():
        for got, ref in zip(qkv_outputs(model, x), qkv_outputs(dense, x)):
            torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)
        torch.testing.assert_close(model(x).logits, dense(x).logits, rtol=0, atol=1e-8)


def test_parameter_count_and_shared_storage(tiny_llama, token_batches):
    stats = calibrate(tiny_llama, token_batches)
    before = sum(p.numel() for p in tiny_llama.parameters())
    report = compress_joint(tiny_llama, "svd_llm_v2", stats, ratio=0.3)
    e, sizes = 64, [64, 32, 32]
    r = joint_rank_for_ratio(sizes, e, 0.3)
    assert r == int(0.7 * 64 * 128 // 192) == 29
    for row in report.layers:
        assert row.rank == r and row.shape == (128, 64)
        assert row.params_before == 64 * 128
        assert row.params_after == r * (e + sum(sizes)) == 5568  # one shared down (r x E) + three ups
    after = sum(p.numel() for p in tiny_llama.parameters())
    assert before - after == 2 * (8192 - 5568) == report.model_params_before - report.model_params_after
    assert 0.3 <= report.params_ratio < 0.33
    keys = [k for k in tiny_llama.state_dict() if "layers.0.self_attn" in k]
    assert sorted(keys) == sorted([
        "model.layers.0.self_attn.qkv_latent.down.weight", "model.layers.0.self_attn.o_proj.weight",
        *(f"model.layers.0.self_attn.{m}_proj.up.weight" for m in "qkv")])
    attn = tiny_llama.model.layers[0].self_attn
    assert attn.q_proj.latent is attn.k_proj.latent is attn.v_proj.latent is attn.qkv_latent


def test_smollm2_rank_budget_formulas():
    # SmolLM2-135M: E = 576, q 576x576, k/v 192x576 (3 KV heads x 64)
    e, sizes = 576, [576, 192, 192]
    dense = e * sum(sizes)
    for ratio in (0.2, 0.4, 0.6):
        r = joint_rank_for_ratio(sizes, e, ratio)
        assert r * (e + sum(sizes)) <= (1 - ratio) * dense < (r + 1) * (e + sum(sizes))
    assert joint_rank_for_ratio(sizes, e, 0.2) == 288  # R1 = r/360 = 0.8; latent 288 < K/V 384 per token


def test_latent_computed_once_per_input(tiny_llama, token_batches):
    compress_joint(tiny_llama, "svd", ratio=0.3)
    calls = []
    for layer in tiny_llama.model.layers:
        layer.self_attn.qkv_latent.down.register_forward_hook(lambda *a: calls.append(1))
    with torch.no_grad():
        tiny_llama(**token_batches[0])
    assert len(calls) == 2  # one per block, not three
    latents = [layer.self_attn.qkv_latent for layer in tiny_llama.model.layers]
    assert [lat.uses for lat in latents] == [3, 3] and all(not lat.memo.held for lat in latents)  # released
    latent = latents[0]
    x = torch.randn(3, 64)
    z = latent(x)
    assert latent(x) is z
    x.mul_(2.0)  # in-place change bumps the version: recomputed
    z2 = latent(x)
    torch.testing.assert_close(z2, 2 * z)
    assert latent(x) is z2 and latent(x) is z2 and not latent.memo.held  # let go after the third read
    z3 = latent(x)
    assert z3 is not z2 and torch.equal(z3, z2) and latent.memo.held  # a fourth read recomputes
    twin = pickle.loads(pickle.dumps(latent.memo))  # a held product (a weak reference) is not carried along
    assert not twin.held and twin.uses == 3 and not copy.deepcopy(latent).memo.held
    with pytest.raises(ValueError, match="at least one reader"):
        type(latent)(64, 8, uses=0)


def test_subset_components_build_selected_triplets():
    g = torch.Generator().manual_seed(0)
    ws = [torch.randn(8, 6, generator=g, dtype=torch.float64), torch.randn(4, 6, generator=g, dtype=torch.float64)]
    f = decompose_joint(build_method("svd"), ws, None, "g", components=[0, 2, 5])
    u, s, vh = torch.linalg.svd(torch.cat(ws), full_matrices=False)
    expect = sum(s[i] * torch.outer(u[:, i], vh[i]) for i in (0, 2, 5))
    torch.testing.assert_close(torch.cat(f.ups) @ f.down, expect, rtol=0, atol=1e-10)
    assert f.truncation_loss == pytest.approx(float(s[[1, 3, 4]].square().sum().sqrt()), rel=1e-10)
    with pytest.raises(ValueError, match="components"):
        decompose_joint(build_method("svd"), ws, None, "g", components=[7])


def test_plan_rebuilds_joint_structure(tiny_llama, token_batches, tmp_path):
    report = compress_joint(tiny_llama, "svd_llm_v2", calibrate(tiny_llama, token_batches), ratio=0.4)
    save_plan(report.plan, tmp_path / "plan.json")
    plan = load_plan(tmp_path / "plan.json")
    assert plan["joint_groups"]["model.layers.1.self_attn"] == {
        "members": ["q_proj", "k_proj", "v_proj"], "rank": 25, "in_features": 64, "out_features": [64, 32, 32],
        "bias": [False, False, False]}
    fresh = make_tiny_llama(seed=7)
    assert apply_plan(fresh, plan) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    fresh.load_state_dict(tiny_llama.state_dict(), strict=True)
    x = token_batches[1]["input_ids"]
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, tiny_llama(x).logits)
    assert apply_plan(fresh, plan) == []
    clone = copy.deepcopy(fresh)  # the shared latent stays shared in a copy
    attn = clone.model.layers[0].self_attn
    assert isinstance(attn.q_proj, JointProjection) and attn.q_proj.latent is attn.qkv_latent
    assert isinstance(attn.qkv_latent, JointLatent)


def test_failure_leaves_model_unchanged(tiny_llama):
    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    with pytest.raises(ValueError, match="needs calibration statistics"):
        compress_joint(tiny_llama, "svd_llm", None, ratio=0.3)
    assert set(tiny_llama.state_dict()) == set(state)
    assert not hasattr(tiny_llama.model.layers[0].self_attn, "qkv_latent")
    with pytest.raises(ValueError, match="'model.nope' matches no eligible targeted layer or joint group"):
        compress_joint(tiny_llama, "svd", overrides={"model.nope": {"rank": 3}})


def test_a_failure_after_the_joint_groups_restores_them_too(tiny_llama, monkeypatch):
    """Groups are factorized first; a later per-matrix failure puts every group and layer back."""
    from compression import Recipe, compress_
    from compression.methods import Method

    state = {k: v.clone() for k, v in tiny_llama.state_dict().items()}
    real = Method.decompose

    def fail_on_last_o_proj(self, weight, stats, rank, name):
        if name == "model.layers.1.self_attn.o_proj":
            raise FloatingPointError(f"SVD of layer {name!r} produced non-finite values")
        return real(self, weight, stats, rank, name)

    monkeypatch.setattr(Method, "decompose", fail_on_last_o_proj)
    with pytest.raises(FloatingPointError, match="model.layers.1.self_attn.o_proj"):
        recipe = Recipe("svd", ratio=0.3, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj", "o_proj"])
        compress_(tiny_llama, recipe, family=CausalLMSpec(model=tiny_llama))
    assert not any(hasattr(layer.self_attn, "qkv_latent") for layer in tiny_llama.model.layers)
    assert tiny_llama.state_dict().keys() == state.keys()
    assert all(torch.equal(v, state[k]) for k, v in tiny_llama.state_dict().items())


def test_merge_to_linear_matches(tiny_llama, token_batches):
    compress_joint(tiny_llama, "svd", ratio=0.3)
    proj = tiny_llama.model.layers[0].self_attn.k_proj
    x = torch.randn(5, 64)
    torch.testing.assert_close(proj.to_linear()(x), proj(x), rtol=1e-5, atol=1e-6)


def test_joint_factors_are_not_retargeted(tiny_llama, token_batches):
    from compression import Recipe, compress_

    compress_joint(tiny_llama, "svd", ratio=0.3)
    report = compress_(tiny_llama, Recipe("svd", ratio=0.3))
    assert sorted({r.name.rsplit(".", 1)[-1] for r in report.layers}) == ["down_proj", "gate_proj", "o_proj", "up_proj"]
    assert "model.layers.0.self_attn.q_proj.up" in report.skipped
    assert torch.isfinite(tiny_llama(**token_batches[0]).logits).all()


def test_joint_layers_run_under_inference_mode(tiny_llama, token_batches):
    from compression import collect_stats, eligible_linears

    stats = collect_stats(tiny_llama, list(eligible_linears(tiny_llama)[0]), token_batches)
    compress_joint(tiny_llama, "svd_llm", stats, ratio=0.3)
    x = token_batches[0]["input_ids"]
    with torch.no_grad():
        ref = tiny_llama(x).logits
    with torch.inference_mode():  # what Trainer.test runs under: tensors without a version counter
        out = tiny_llama(x).logits
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
