"""QSVD through the Lightning callbacks: joint q/k/v, gradient/v2 allocation, rotation + β + quantization."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from compression import LowRankLinear, QuantLinear, Recipe, split_batch, spread_batches
from compression.joint import LATENT_NAME, JointProjection
from lightning_modules import CausalLMSpec, CompressionModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from tests.conftest import make_tiny_llama
from tests.lightning_helpers import TinyTokens

RATIO = 0.3


def trainer(tmp_path) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=0, enable_progress_bar=False,
                   logger=False, plugins=[AtomicCheckpointIO()], enable_model_summary=False,
                   enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=tmp_path)


def recipe(allocation: str = "uniform", quantization: dict | None = None, **fields) -> Recipe:
    """svd_llm joint q/k/v at RATIO (other Linears per matrix), 2 gradient batches, optional quantization."""
    return Recipe("svd_llm", ratio=RATIO, joint_qkv=True, allocation=allocation,
                  calibration={"progress": False, "gradient_batches": 2}, quantization=quantization, **fields)


def fit(tmp_path, compression: Recipe, double: bool = False) -> CompressionModule:
    model = make_tiny_llama()
    module = CompressionModule(CausalLMSpec(model=model.double() if double else model), compression=compression)
    trainer(tmp_path).fit(module, datamodule=TinyTokens())
    return module


def qkv_budget(model) -> int:
    """Parameters per-matrix truncation may keep over all q/k/v and other targets at RATIO."""
    eligible = [m for n, m in model.named_modules() if type(m) is torch.nn.Linear and n != "lm_head"]
    return int((1 - RATIO) * sum(m.in_features * m.out_features for m in eligible))


def _joint_groups(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if hasattr(m, LATENT_NAME)]


@pytest.mark.parametrize("strategy", ["uniform", "v2", "gradient"])
def test_joint_qkv_allocations_keep_the_budget_and_reload(tmp_path, strategy):
    dense = make_tiny_llama()
    budget = qkv_budget(dense)
    module = fit(tmp_path, recipe(strategy))
    plan, report = module.plan, module.report
    groups = _joint_groups(module.model)
    assert len(groups) == 2 and set(plan["joint_groups"]) == {"model.layers.0.self_attn", "model.layers.1.self_attn"}
    assert all(isinstance(getattr(g, p), JointProjection) for g in groups for p in ("q_proj", "k_proj", "v_proj"))
    assert len(plan["layers"]) == 8  # o_proj, gate, up, down of two layers stay per-matrix
    assert report.targeted_params_before == sum(
        m.in_features * m.out_features for n, m in dense.named_modules() if type(m) is torch.nn.Linear
        and n != "lm_head")
    assert report.targeted_params_after <= budget + 1  # floor per matrix: never above the budget
    assert report.params_ratio == pytest.approx(RATIO, abs=0.03)
    if strategy == "uniform":  # the joint rank keeps q/k/v's per-matrix budget: floor(0.7 * 64 * 128 / 192)
        assert {s["rank"] for s in plan["joint_groups"].values()} == {29}
    if strategy == "gradient":
        ranks = [s["rank"] for s in plan["joint_groups"].values()] + [s["rank"] for s in plan["layers"].values()]
        assert len(set(ranks)) > 2  # heterogeneous: the ranking moved parameters between matrices
    # the structure rebuilds from the plan alone and the weights load strictly
    fresh = make_tiny_llama(seed=3)
    from compression import apply_plan

    apply_plan(fresh, plan)
    fresh.load_state_dict(module.model.state_dict(), strict=True)
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(fresh(x).logits, module.model(x).logits, rtol=0, atol=0)


def test_gradient_subset_keeps_the_chosen_triplets(tmp_path):
    module = fit(tmp_path, recipe("gradient", components="chosen"))
    components = module.pipeline.allocation.components
    assert set(components) == set(module.plan["joint_groups"])
    for group, comps in components.items():
        assert module.plan["joint_groups"][group]["rank"] == len(comps) == len(set(comps))


def test_rotation_and_latent_rotation_leave_the_float64_function_unchanged(tmp_path):
    plain = fit(tmp_path / "a", recipe(), double=True)
    rotated = fit(tmp_path / "b", recipe(quantization={"rotate": True, "latent_rotation": True}), double=True)
    assert "rotation" in rotated.plan and "quantization" not in rotated.plan  # rotations only, float weights
    assert rotated.plan["method"]["name"] == "svd_llm" and rotated.plan["ratio"] == RATIO
    x = torch.randint(0, 128, (2, 12))
    with torch.no_grad():  # 1e-6, not 1e-12: transformers' LlamaRMSNorm normalises in float32 even for float64
        torch.testing.assert_close(rotated.model(x).logits, plain.model(x).logits, rtol=0, atol=1e-6)
    # the weights did change: H1 rotated the residual stream, H2 and β the latents
    w0 = plain.model.model.layers[0].self_attn.qkv_latent.down.weight
    w1 = rotated.model.model.layers[0].self_attn.qkv_latent.down.weight
    assert (w0 - w1).abs().max() > 1e-3


def test_full_qsvd_checkpoint_reloads_and_scores_identically(tmp_path):
    module = fit(tmp_path, recipe("gradient", quantization={"weight_bits": 8, "act_bits": 8, "rotate": True,
                                                            "beta_search": True, "clip_grid": 10,
                                                            "betas": [0.3, 0.5, 0.7]}))
    plan = module.plan
    assert {"rotation", "joint_groups", "layers", "quantization"} <= set(plan)
    assert plan["allocation"] == "gradient" and set(plan["quantization"]["beta"]) == {
        "model.layers.0.self_attn.qkv_latent", "model.layers.1.self_attn.qkv_latent",
        *(f"{name}" for name in plan["layers"])}
    quantized = [n for n, m in module.model.named_modules() if isinstance(m, QuantLinear)]
    assert "lm_head" not in quantized and len(quantized) == 2 * (1 + 3) + 2 * 8  # latent down + 3 ups; 8 factors
    assert not any(type(m) is torch.nn.Linear for n, m in module.model.named_modules() if n != "lm_head")
    dm = TinyTokens()
    t = trainer(tmp_path)
    in_memory = t.test(module, datamodule=dm, verbose=False)[0]
    assert all(torch.isfinite(torch.tensor(v)) for v in in_memory.values())
    ckpt = tmp_path / "qsvd.ckpt"
    t.save_checkpoint(ckpt)
    fresh = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=5)))
    reloaded = trainer(tmp_path / "eval").test(fresh, datamodule=dm, ckpt_path=ckpt, verbose=False)[0]
    assert reloaded.keys() == in_memory.keys()
    for key in in_memory:
        assert reloaded[key] == pytest.approx(in_memory[key], rel=1e-6)
    assert sum(isinstance(m, QuantLinear) for m in fresh.model.modules()) == len(quantized)
    assert not any(isinstance(m, LowRankLinear) and type(m.down) is torch.nn.Linear for m in fresh.model.modules())


def test_misuse_is_explained(tmp_path):
    with pytest.raises(ValueError, match="quantization and lora in one recipe"):
        recipe(quantization={"weight_bits": 8}, lora={"steps": [1, 1]})
    with pytest.raises(ValueError, match="no attention module has all of its q/k/v"):
        fit(tmp_path, Recipe("svd", ratio=RATIO, targets=["q_proj", "v_proj"], joint_qkv=True))
    with pytest.raises(ValueError, match="does nothing"):
        Recipe(None)
    with pytest.raises(ValueError, match="components"):
        Recipe(allocation="gradient", components="top")
    with pytest.raises(ValueError, match="beta_search chooses β for quantized factors"):
        recipe(quantization={"rotate": True, "beta_search": True})


def test_split_batch_slices_every_per_sample_entry():
    batch = {"input_ids": torch.arange(6).view(3, 2), "names": ["a", "b", "c"], "scale": torch.tensor(2.0)}
    parts = split_batch(batch)
    assert [p["input_ids"].tolist() for p in parts] == [[[0, 1]], [[2, 3]], [[4, 5]]]
    assert [p["names"] for p in parts] == [["a"], ["b"], ["c"]] and all(p["scale"] == 2.0 for p in parts)
    assert len(split_batch(torch.zeros(4, 3))) == 4 and split_batch("x") == ["x"]


def test_beta_by_calibration_loss_picks_the_best_candidate_and_applies_it(tmp_path):
    module = fit(tmp_path, recipe(quantization={"weight_bits": 4, "act_bits": 8, "rotate": True, "clip_grid": 0,
                                                "beta_search": True, "beta_objective": "loss",
                                                "betas": [0.0, 0.5, 1.0], "max_batches": 2}))
    quant = module.plan["quantization"]
    losses = {float(b): v for b, v in quant["beta_losses"].items()}
    best = min(losses, key=losses.get)
    assert len(losses) == 3 and len(set(losses.values())) == 3  # β matters once weights are 4-bit
    assert set(quant["beta"].values()) == {best}
    # the applied model is the winning trial: its calibration loss is the recorded minimum
    batches = list(spread_batches(TinyTokens().calibration_dataloader(), 2))  # the batches the search scored
    with torch.no_grad():
        loss = sum(float(module.spec.training_loss(module.model, b)) for b in batches) / 2
    assert loss == pytest.approx(losses[best], rel=1e-6)
    with pytest.raises(ValueError, match="beta_objective"):
        Recipe(quantization={"beta_objective": "perplexity"})


def test_calibration_batches_are_spread_over_the_loader():
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(32)), batch_size=4)  # 8 batches: a mix lists one corpus, then the other
    firsts = [int(b[0]) for b in spread_batches(loader, 4)]
    assert firsts == [0, 8, 20, 28]  # batches 0, 2, 5, 7: both halves of the calibration set
    assert [int(b[0]) for b in spread_batches(loader, 1)] == [0]
    assert len(list(spread_batches(loader, None))) == len(list(spread_batches(loader, 100))) == 8
    assert [int(b[0]) for b in spread_batches((b for b in loader), 3)] == [0, 4, 8]  # no len: the first ones
