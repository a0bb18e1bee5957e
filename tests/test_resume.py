"""Resume inside UVLoRA stage 2 reproduces the uninterrupted run's per-step losses exactly (CPU, tiny LLaMA).

The interrupted run stops at ``max_steps`` with ``ModelCheckpoint`` files saved along the way;
the resumed run rebuilds the plan (no recalibration), re-attaches the adapters before the
weights load, restores the stage from the global step and the callback's state, and must
not redo stage 1.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer

from compression import Recipe
from lightning_modules import CausalLMSpec, CompressionModule
from lightning_modules.module import RecipeMismatch
from tests.conftest import make_tiny_llama
from tests.lightning_helpers import cpu_trainer
from tests.test_lora import OrderedTokens, Recorder

STEPS = [4, 8]  # stage 1 = steps 0-3, stage 2 = steps 4-11; 4 batches per epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


RECIPE = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                lora={"steps": STEPS, "r": 2, "alpha": 4, "dropout": 0.0, "learning_rate": [2e-2, 1e-2]})


def run(tmp_path, name, max_steps=-1, ckpt_path=None, seed=0, every=None, stateful=True, recipe=RECIPE):
    rec = Recorder()
    trainer = cpu_trainer(tmp_path / name, [rec], max_steps, every)
    # a fresh model with other weights: a resumed run must take everything from the checkpoint
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=seed)), compression=recipe,
                               learning_rate=5e-3)
    lora = module.stage_callbacks()[-1]
    if stateful:  # Lightning's stateful API: configure_model sees the path and rebuilds the plan
        trainer.ckpt_path = ckpt_path
        trainer.fit(module, datamodule=OrderedTokens())
        trainer.ckpt_path = None  # or a later trainer.test() would load it again
    else:
        trainer.fit(module, datamodule=OrderedTokens(), ckpt_path=ckpt_path)
    return module, rec, lora, trainer


def test_resume_inside_stage_two_reproduces_losses(tmp_path):
    full, full_rec, _, _ = run(tmp_path, "full")
    assert len(full_rec.losses) == 12 and full_rec.stages == [1] * 4 + [2] * 8

    _, cut_rec, _, _ = run(tmp_path, "cut", max_steps=8, every=2)
    assert cut_rec.losses == full_rec.losses[:8]
    ckpt = tmp_path / "ckpt" / "step=8.ckpt"
    saved = torch.load(ckpt, weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("UVLoRA"))
    assert state["boundaries"] == [4, 12] and state["merged"] == ["down"]
    assert saved["uv_lora"]["scaling"] == 2.0

    resumed, rec, lora, trainer = run(tmp_path, "resumed", ckpt_path=ckpt, seed=11)
    # no recalibration, and stage 1 was not redone: the run starts at step 8, in stage 2, down side merged
    assert resumed.pipeline is None and resumed.plan_restored
    assert rec.stages == [2] * 4 and lora.merged == ["down", "up"]
    assert trainer.global_step == 12
    assert rec.losses == pytest.approx(full_rec.losses[8:], rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_with_the_cosine_schedule_reproduces_losses(tmp_path):
    """``lora.schedule: cosine`` on the module's own rate: each step's rate comes from the global step and the
    optimizer group's base rate, saved with the optimizer state (the group's current rate at step 8 is a decayed
    one; taking it as the base would change every later step)."""
    recipe = Recipe.from_dict({**RECIPE.to_dict(), "lora": {**RECIPE.lora.__dict__, "learning_rate": None,
                                                             "schedule": "cosine", "warmup": 0.25}})
    full, full_rec, _, _ = run(tmp_path, "full", recipe=recipe)
    run(tmp_path, "cut", max_steps=8, every=8, recipe=recipe)
    resumed, rec, _, _ = run(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / "step=8.ckpt", seed=11, recipe=recipe)
    assert rec.stages == [2] * 4
    assert rec.losses == pytest.approx(full_rec.losses[8:], rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("cut", [4, 8])
def test_resume_with_joint_stages_reproduces_losses(tmp_path, cut):
    """``lora.order: [both, both]``: cut at the stage boundary (step 4: stage 1 not merged yet, the resumed run
    merges it) or inside stage 2 (step 8: merged and restarted before the checkpoint, not merged again)."""
    recipe = Recipe.from_dict({**RECIPE.to_dict(), "lora": {**RECIPE.lora.__dict__, "order": ["both", "both"]}})
    full, full_rec, _, _ = run(tmp_path, "full", recipe=recipe)
    run(tmp_path, "cut", max_steps=cut, every=cut, recipe=recipe)
    saved = torch.load(tmp_path / "ckpt" / f"step={cut}.ckpt", weights_only=True)
    state = next(v for k, v in saved["callbacks"].items() if k.startswith("UVLoRA"))
    assert state["merged"] == ([] if cut == 4 else ["down", "up"])
    resumed, rec, _, _ = run(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / f"step={cut}.ckpt", seed=11,
                             recipe=recipe)
    assert rec.stages == [2] * (12 - cut)
    assert rec.losses == pytest.approx(full_rec.losses[cut:], rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_resume_through_fit_ckpt_path_with_the_module_told_matches(tmp_path):
    """``fit(ckpt_path=...)`` names the file after configure_model; telling the module (as the CLI does)
    rebuilds the plan instead of recompressing."""
    full, full_rec, _, _ = run(tmp_path, "full")
    run(tmp_path, "cut", max_steps=8, every=8)
    rec = Recorder()
    trainer = cpu_trainer(tmp_path / "resumed", [rec])
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=3)), compression=RECIPE, learning_rate=5e-3)
    module.checkpoint_path = str(tmp_path / "ckpt" / "step=8.ckpt")
    trainer.fit(module, datamodule=OrderedTokens(), ckpt_path=module.checkpoint_path)
    assert module.pipeline is None and module.plan_restored  # nothing recalibrated
    assert rec.losses == pytest.approx(full_rec.losses[8:], rel=1e-6, abs=1e-7)


def test_resume_with_another_recipe_is_refused(tmp_path):
    run(tmp_path, "cut", max_steps=4, every=4)
    changed = Recipe.from_dict({**RECIPE.to_dict(), "ratio": 0.4})
    with pytest.raises(RecipeMismatch, match=r"ratio: 0.3 -> 0.4.*Drop the --compression changes"):
        run(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / "step=4.ckpt", recipe=changed)


def test_resume_mid_epoch_inside_stage_two(tmp_path):
    """Step 6 is in the middle of epoch 2: Lightning restarts the epoch's loader, so the batches differ."""
    full, full_rec, _, _ = run(tmp_path, "full")
    run(tmp_path, "cut", max_steps=6, every=6)
    _, rec, lora, trainer = run(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / "step=6.ckpt", seed=11)
    assert trainer.global_step == 12 and rec.stages == [2] * 6 and lora.merged == ["down", "up"]
    assert all(torch.isfinite(torch.tensor(rec.losses)))


def test_resume_with_other_stage_lengths_is_refused(tmp_path):
    run(tmp_path, "cut", max_steps=4, every=4)
    recipe = Recipe.from_dict({**RECIPE.to_dict(), "lora": {**RECIPE.lora.__dict__, "steps": [2, 8]}})
    with pytest.raises(RecipeMismatch, match=r"lora.steps: \[4, 8\] -> \[2, 8\]"):
        run(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / "step=4.ckpt", recipe=recipe)


def test_resume_from_a_checkpoint_without_adapters_is_explained(tmp_path):
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=Recipe(ratio=0.3))
    t = Trainer(accelerator="cpu", devices=1, max_steps=0, logger=False, enable_progress_bar=False,
                enable_model_summary=False)
    t.fit(module, datamodule=OrderedTokens())
    t.save_checkpoint(tmp_path / "compressed.ckpt")
    t2 = Trainer(accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_progress_bar=False)
    # a LoRA recipe asked to resume a checkpoint compressed without LoRA: another recipe, refused up front
    fresh = CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=Recipe(ratio=0.3, lora={"steps": 2}))
    fresh.checkpoint_path = str(tmp_path / "compressed.ckpt")
    with pytest.raises(RecipeMismatch, match="lora.steps: None -> 2"):
        t2.fit(fresh, datamodule=OrderedTokens(), ckpt_path=fresh.checkpoint_path)
