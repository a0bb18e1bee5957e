"""Hadamard matrices, fused residual rotation (exact in float64), H2, β rebalancing and β search."""

from __future__ import annotations

import copy

import pytest
import torch

from compression import (
    ActQuantConfig,
    Recipe,
    WeightQuantConfig,
    apply_plan,
    collect_stats,
    compress_,
    eligible_linears,
)
from compression.hadamard import (
    HadamardTransform,
    hadamard_factors,
    hadamard_matrix,
    paley,
    random_orthogonal,
    randomized_hadamard,
)
from compression.rotation import (
    capture_inputs,
    lowrank_pairs,
    rebalance_,
    rotate_all_latents_,
    rotate_model_,
    search_beta_,
    singular_values_from_up,
)
from models.layouts import layout_of
from tests.conftest import compress_joint, make_tiny_llama


@pytest.mark.parametrize("n", [12, 20, 28, 36, 64, 576, 1536])
def test_hadamard_matrices_are_hadamard(n):
    h = hadamard_matrix(n, normalized=False)
    assert torch.equal(h.abs(), torch.ones(n, n, dtype=torch.float64))
    assert torch.equal(h @ h.T, n * torch.eye(n, dtype=torch.float64))


def test_factorizations_of_model_sizes():
    assert hadamard_factors(576) == (12, 12, 4)  # 576 = 2^6 · 9: two order-12 Paley factors
    assert hadamard_factors(1536) == (12, 128)
    assert hadamard_factors(64) == (64,)
    assert hadamard_factors(100) is None and paley(100) is None  # falls back to random orthogonal
    assert paley(12) is not None and paley(28) is not None  # Paley I (p = 11) and II (q = 13)


@pytest.mark.parametrize("n", [64, 100, 576, 1536])
def test_transforms_are_orthogonal_and_match_dense(n):
    t = HadamardTransform(n)
    m = t.matrix()
    torch.testing.assert_close(m @ m.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)
    x = torch.randn(3, 5, n, dtype=torch.float64)
    torch.testing.assert_close(t(x), x @ m, rtol=0, atol=1e-12)
    for q in (randomized_hadamard(n, seed=1), random_orthogonal(n, seed=2)):
        torch.testing.assert_close(q @ q.T, torch.eye(n, dtype=torch.float64), rtol=0, atol=1e-12)


def _random_norms_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.5 * torch.rand_like(p))


def _logits(model, x):
    with torch.no_grad():
        return model(x).logits


@pytest.mark.parametrize("structure", ["dense", "lowrank", "joint"])
@pytest.mark.parametrize("tie", [True, False])
def test_fused_rotation_leaves_float64_logits_unchanged(structure, tie, token_batches):
    model = make_tiny_llama(tie=tie).double()
    _random_norms_(model)
    x = token_batches[0]["input_ids"]
    if structure == "lowrank":
        compress_(model, Recipe("svd", ratio=0.3))
    elif structure == "joint":
        compress_joint(model, "svd", ratio=0.3)
    ref = _logits(model, x)
    entry = rotate_model_(model, layout_of(model), kind="random_hadamard", seed=3)
    assert getattr(model.lm_head, "weight", None) is not model.model.embed_tokens.weight
    assert all(torch.all(la.input_layernorm.weight == 1) for la in model.model.layers)
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=1e-6)
    assert entry["residual"] == {"kind": "random_hadamard", "seed": 3, "size": 64}
    assert entry["untied"] == ({"head": "lm_head", "embedding": "model.embed_tokens"} if tie else None)
    assert list(entry["online"]["mlps"]) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    # the rotation really changed the stored weights (not a no-op)
    assert not torch.allclose(model.model.embed_tokens.weight, make_tiny_llama(tie=tie).double().model.embed_tokens
                              .weight)


def test_rotation_plan_rebuilds_structure(token_batches):
    model = make_tiny_llama().double()
    report = compress_joint(model, "svd", ratio=0.3)
    plan = {**report.plan, "rotation": rotate_model_(model, layout_of(model))}
    fresh = make_tiny_llama(seed=9).double()
    changed = apply_plan(fresh, plan)
    assert "lm_head" in changed and "model.layers.1.mlp" in changed
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = token_batches[0]["input_ids"]
    assert torch.equal(_logits(fresh, x), _logits(model, x))


def test_latent_rotation_and_rebalance_keep_products(token_batches):
    model = make_tiny_llama().double()
    stats = collect_stats(model, list(eligible_linears(model)[0]), token_batches)
    compress_joint(model, "svd_llm_v2", stats, ratio=0.3)
    compress_(model, Recipe("svd_llm_v2", ratio=0.3, targets=["o_proj"]), stats)
    x = token_batches[0]["input_ids"]
    ref = _logits(model, x)
    pairs = lowrank_pairs(model)
    assert set(pairs) == {f"model.layers.{i}.self_attn.{n}" for i in range(2) for n in ("qkv_latent", "o_proj")}
    down, ups = pairs["model.layers.0.self_attn.qkv_latent"]
    sigma = singular_values_from_up(ups, 0.5)
    for beta in (0.0, 0.2, 0.9):
        rebalance_(down, ups, 0.5, beta)
        # down rows now carry σ^β: their norms in the whitened space are not checked here, the product is
        torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=1e-9)
        torch.testing.assert_close(singular_values_from_up(ups, beta), sigma, rtol=1e-9, atol=0)
        rebalance_(down, ups, beta, 0.5)
    ranks = rotate_all_latents_(model, seed=1)
    assert ranks["model.layers.0.self_attn.qkv_latent"] == down.weight.shape[0]
    torch.testing.assert_close(_logits(model, x), ref, rtol=0, atol=1e-9)


def test_beta_search_picks_the_minimum_on_calibration_inputs(token_batches):
    model = make_tiny_llama()
    stats = collect_stats(model, list(eligible_linears(model)[0]), token_batches)
    compress_joint(model, "svd_llm_v2", stats, ratio=0.3)
    names = [f"model.layers.{i}.self_attn.qkv_latent" for i in range(2)]
    inputs = capture_inputs(model, names, token_batches, max_tokens=64)
    assert {n: tuple(v.shape) for n, v in inputs.items()} == dict.fromkeys(names, (64, 64))
    x = token_batches[0]["input_ids"]
    ref = _logits(model, x)
    w, a = WeightQuantConfig(bits=4, grid=20), ActQuantConfig(bits=4, clip_ratio=0.9)
    per_layer = search_beta_(copy.deepcopy(model), inputs, w, a, latent_seed=None)
    result = search_beta_(model, inputs, w, a, latent_seed=0)
    for name, r in result.items():
        assert r["beta"] == [i / 10 for i in range(11)][min(range(11), key=r["errors"].__getitem__)]
        assert min(r["errors"]) <= r["errors"][5]  # never worse than the default β = 0.5
        assert per_layer[name]["errors"] != r["errors"]  # H2 changes the quantized error
    torch.testing.assert_close(_logits(model, x), ref, rtol=1e-4, atol=1e-5)  # float function unchanged
    glob = search_beta_(copy.deepcopy(model), inputs, w, a, latent_seed=None, per_layer=False, beta_from=0.5)
    assert len({r["beta"] for r in glob.values()}) == 1


def test_full_qsvd_recipe_plan_round_trip(token_batches):
    """Joint QKV + gradient allocation + H1/H2 + β search + W4A4 through the one entry point; the plan
    alone rebuilds a model that loads the state dict strictly and gives the same logits."""
    from compression import Recipe, compress_
    from lightning_modules.specs import CausalLMSpec

    model = make_tiny_llama()
    recipe = Recipe("svd_llm_v2", ratio=0.4, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"],
                    allocation="gradient", calibration={"gradient_batches": 2},
                    quantization={"weight_bits": 4, "act_bits": 4, "rotate": True, "beta_search": True,
                                  "clip_grid": 20, "calibration_tokens": 48})
    report = compress_(model, recipe, family=CausalLMSpec(model=model), batches=token_batches)
    plan = report.plan
    assert set(plan) >= {"joint_groups", "rotation", "quantization", "recipe"} and len(plan["joint_groups"]) == 2
    assert len(set(plan["quantization"]["beta"].values())) >= 1 and plan["recipe"] == recipe.to_dict()
    assert len({g["rank"] for g in plan["joint_groups"].values()}) == 2  # gradient allocation: heterogeneous
    fresh = make_tiny_llama(seed=5)
    apply_plan(fresh, plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    x = token_batches[2]["input_ids"]
    assert torch.equal(_logits(fresh, x), _logits(model, x))
    with pytest.raises(ValueError, match="already quantized"):
        rotate_model_(model, layout_of(model))


@pytest.mark.parametrize("layout_knows_post_norms", [True, False])
def test_a_rotation_that_changes_the_output_stops_the_run(token_batches, monkeypatch, layout_knows_post_norms):
    """The rotation stage compares the head's output on the first calibration batch before and after rotating: with
    a layout that misses HyperCLOVAX's post-norms (as the LLaMA layout did before it knew them) the rotated model's
    output is off by ~0.7 and the run stops there, naming the model; with its real layout the recipe runs."""
    from benchmarks.architectures import build
    from compression import Recipe, compress_
    from lightning_modules.specs import CausalLMSpec
    from models.layouts import llama

    if not layout_knows_post_norms:
        monkeypatch.setattr(llama, "OUT_NORMS", {})
    model = build("HyperCLOVAX").float()  # the matrix's model: norm scales away from 1, where a rotation shows them
    recipe = Recipe("svd_llm", ratio=0.3, quantization={"weight_bits": 8, "act_bits": 8, "rotate": True})
    batches = [{"input_ids": b["input_ids"] % 128} for b in token_batches]
    if layout_knows_post_norms:
        report = compress_(model, recipe, family=CausalLMSpec(model=model), batches=batches)
        assert report.plan["rotation"]["site"] == "readers"
        return
    with pytest.raises(RuntimeError, match=r"HyperCLOVAXForCausalLM: rotating the residual stream changed the "
                                           r"model's output by [0-9.]+e-01 .* within 0.001 in torch.float32"):
        compress_(model, recipe, family=CausalLMSpec(model=model), batches=batches)


def test_rotation_check_tolerances():
    """A correct rotation's float error passes (SmolLM2-135M measured 1.3e-6 in float32, 2.9e-2 in bfloat16; Gemma-3
    270M 1.4e-6 / 1.9e-2), a change of 0.6 and more (layouts missing a family's norms) does not."""
    from compression.quantize_stage import check_rotation, rotation_tolerance

    assert rotation_tolerance(torch.float32) == 1e-3 and rotation_tolerance(torch.bfloat16) == 0.1
    model = make_tiny_llama()
    layout = layout_of(model)
    ref = torch.randn(8, 16, generator=torch.Generator().manual_seed(0))
    check_rotation(model, layout, ref, ref * (1 + 5e-4))
    check_rotation(model, layout, ref, None)  # the head did not run: nothing to compare
    with pytest.raises(RuntimeError, match="changed the model's output by 2.00e-03"):
        check_rotation(model, layout, ref, ref * (1 + 2e-3))
    with pytest.raises(RuntimeError, match="by nan"):
        check_rotation(model, layout, ref, ref * float("nan"))


def test_head_rows_stops_the_forward_at_the_head(token_batches):
    """The check's forward ends at the head and applies it to the first 64 rows only (a 128k vocabulary's logits
    for the whole batch would be gigabytes); the rows equal the model's own logits there."""
    from compression.quantize_stage import ROTATION_CHECK_ROWS, head_rows
    from lightning_modules.specs import CausalLMSpec

    model = make_tiny_llama().eval()
    batch = {"input_ids": torch.cat([b["input_ids"] for b in token_batches])}
    assert batch["input_ids"].numel() > ROTATION_CHECK_ROWS
    seen = []
    model.lm_head.register_forward_hook(lambda m, a, out: seen.append(a[0].reshape(-1, a[0].shape[-1]).shape[0]))
    rows = head_rows(model, layout_of(model), batch, CausalLMSpec(model=model).calibration_forward)
    assert seen == [ROTATION_CHECK_ROWS] and rows.shape == (ROTATION_CHECK_ROWS, model.config.vocab_size)
    with torch.no_grad():
        ref = model(**batch).logits.reshape(-1, model.config.vocab_size)[:ROTATION_CHECK_ROWS]
    torch.testing.assert_close(rows, ref.float(), rtol=1e-5, atol=1e-6)
