"""End to end on each tiny VLM: calibrate (both towers) -> gradient allocation -> joint-QKV SVD -> rotations +
W4A4 -> generation-based evaluation -> checkpoint that reloads; the evaluation path on scripted answers;
alternating U/V LoRA on a compressed VLM."""

from __future__ import annotations

import math

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from callbacks.lora import lora_layers
from compression import LowRankLinear, QuantLinear, Recipe
from compression.joint import JointProjection
from data.vqa import VQACollator, VQADataModule, read_scienceqa, read_vizwiz
from lightning_modules import CompressionModule, VLMSpec
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.vlm_spec import model_inputs
from models.vlm_tiny import build_tiny_vlm
from tests.fixtures_vqa import (
    write_scienceqa_fixture,
    write_vizwiz_fixture,
)

pytestmark = pytest.mark.usefixtures("one_thread")

CASES = [("llava", "scienceqa"), ("llava_next", "scienceqa"), ("idefics3", "vizwiz"), ("gemma3", "scienceqa"),
         ("qwen2_5_vl", "vizwiz"), ("qwen3_vl", "scienceqa"), ("qwen3_5", "vizwiz"),
         ("mistral3", "vizwiz"), ("internvl", "scienceqa"),
         ("llava_onevision", "scienceqa"), ("gemma4", "vizwiz")]


def _trainer(callbacks=(), **kw) -> Trainer:
    kw = {"max_steps": 0, **kw}
    return Trainer(accelerator="cpu", devices=1, callbacks=list(callbacks), logger=False, enable_progress_bar=False,
                   enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                   plugins=[AtomicCheckpointIO()], **kw)


def _datamodule(family, dataset, root):
    return VQADataModule(dataset, root=str(root), processor=f"tiny-{family}", calibration_samples=6, test_samples=4,
                         validation_samples=2, eval_batch_size=4, batch_size=2, seed=0)


@pytest.fixture(scope="module")
def roots(tmp_path_factory):
    from data.vqa.synthetic import write_scienceqa, write_vizwiz

    base = tmp_path_factory.mktemp("vqa")
    return {"scienceqa": write_scienceqa(base / "sqa", sizes={"train": 10, "val": 2, "test": 4}),
            "vizwiz": write_vizwiz(base / "vw", sizes={"train": 10, "val": 4})}


@pytest.mark.parametrize("family, dataset", CASES)
def test_qsvd_w4a4_end_to_end_and_checkpoint_reload(family, dataset, roots, tmp_path):
    dm = _datamodule(family, dataset, roots[dataset])
    recipe = Recipe("svd_llm_v2", ratio=0.3, joint_qkv=True, allocation="gradient",
                    calibration={"progress": False, "gradient_batches": 4},
                    quantization={"weight_bits": 4, "act_bits": 4, "rotate": True, "beta_search": True,
                                  "clip_grid": 10, "betas": [0.2, 0.5, 0.8], "calibration_tokens": 64,
                                  "max_batches": 2})
    module = CompressionModule(VLMSpec(f"tiny-{family}", compress_vision=True, max_new_tokens=4), compression=recipe)
    trainer = _trainer([])
    trainer.fit(module, datamodule=dm)
    model, plan = module.model, module.plan
    groups = plan["joint_groups"]
    assert any(("language_model" in g or "text_model" in g) for g in groups)
    if family.startswith("qwen"):  # their ViT's fused qkv is compressed as one matrix (the joint factorization)
        assert isinstance(model.get_submodule("model.visual.blocks.0.attn.qkv"), LowRankLinear)
    else:
        assert any(".vision_" in g for g in groups)
    assert plan["allocation"] == "gradient" and "rotation" in plan and plan["quantization"]["act"]["bits"] == 4
    if family in ("gemma3", "gemma4"):  # post-norms: rotated at the readers, the stream and projector untouched
        assert plan["rotation"]["site"] == "readers" and "stream_writers" not in plan["rotation"]
    else:
        assert plan["rotation"]["stream_writers"]["linears"]  # the projector output was rotated
    # one projection per group member: q/k/v, or the four stream readers of a Qwen3.5 linear attention
    members = sum(len(g["members"]) for g in groups.values())
    assert sum(isinstance(m, JointProjection) for m in model.modules()) == members
    assert any(isinstance(m, QuantLinear) for m in model.modules())
    assert isinstance(model.lm_head, torch.nn.Linear) and not isinstance(model.lm_head, QuantLinear)
    first = trainer.test(module, datamodule=dm, verbose=False)[0]
    key = f"test/accuracy/{dm.test_names[0]}"
    assert math.isfinite(first[key]) and 0.0 <= first[key] <= 100.0
    ckpt = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(ckpt)
    batch = next(iter(dm.calibration_dataloader()))
    with torch.no_grad():
        ref = model(**model_inputs(batch), use_cache=False).logits

    fresh = CompressionModule(VLMSpec(f"tiny-{family}", seed=7, compress_vision=True, max_new_tokens=4))
    again = _trainer().test(fresh, datamodule=dm, ckpt_path=str(ckpt), verbose=False)[0]
    assert again == pytest.approx(first, abs=1e-9)
    with torch.no_grad():
        torch.testing.assert_close(fresh.model(**model_inputs(batch), use_cache=False).logits, ref, rtol=0, atol=1e-5)


class _Scripted(torch.nn.Module):
    """Wraps a model; ``generate`` appends the scripted answers' tokens to the prompt."""

    def __init__(self, model, tokenizer, answers):
        super().__init__()
        self.inner, self.tok, self.answers = model, tokenizer, answers
        self.generation_config = model.generation_config

    def forward(self, **kw):
        return self.inner(**kw)

    def generate(self, input_ids, **kw):
        eos = [self.tok.eos_token_id]
        rows = [self.tok(" " + a, add_special_tokens=False)["input_ids"] + eos for a in self.answers]
        width = max(map(len, rows))
        new = torch.tensor([r + [self.tok.pad_token_id] * (width - len(r)) for r in rows])
        return torch.cat([input_ids, new], 1)


def test_evaluate_scores_the_generated_answers(tmp_path):
    model, processor = build_tiny_vlm("llava")
    spec = VLMSpec(model=model, processor=processor)
    sqa = VQACollator(processor, "eval")(read_scienceqa(write_scienceqa_fixture(tmp_path / "s"), "test"))
    metrics = spec.make_metrics()
    loss = spec.evaluate(_Scripted(model, processor.tokenizer, ["C", "B"]), sqa, metrics)  # right, wrong
    assert torch.isfinite(loss)
    out = spec.compute_metrics(metrics)
    assert float(out["accuracy"]) == pytest.approx(50.0) and float(out["parse_failures"]) == 0.0
    vw = VQACollator(processor, "eval")(read_vizwiz(write_vizwiz_fixture(tmp_path / "v"), "val"))
    metrics = spec.make_metrics()
    spec.evaluate(_Scripted(model, processor.tokenizer, ["Two.", "blue"]), vw, metrics)
    # "Two." -> "2": 8 of 10 annotators -> 1.0; "blue": 2 annotators -> (2 * 1/3 + 8 * 2/3) / 10 = 0.6
    assert float(spec.compute_metrics(metrics)["accuracy"]) == pytest.approx(100 * (1.0 + 0.6) / 2)
    assert spec.generate(_Scripted(model, processor.tokenizer, ["x y", "z"]), vw["prompt"]) == ["x y", "z"]


class _Snapshot(Callback):
    """The low-rank factors at train start (after compression, adapters attached, before any step)."""

    def __init__(self):
        self.weights = {}

    def on_train_start(self, trainer, pl_module):
        for name, layer in lora_layers(pl_module.model).items():
            self.weights[name] = layer.get_base_layer().weight.detach().clone()


def test_uv_lora_recovers_a_compressed_vlm(roots):
    dm = _datamodule("idefics3", "scienceqa", roots["scienceqa"])
    recipe = Recipe("svd_llm_v2", ratio=0.3, calibration={"progress": False},
                    lora={"steps": [2, 2], "r": 2, "alpha": 4.0, "dropout": 0.0})
    module = CompressionModule(VLMSpec("tiny-idefics3", max_new_tokens=2), compression=recipe, learning_rate=1e-2)
    lora, snap = module.stage_callbacks()[-1], _Snapshot()
    trainer = _trainer([snap], max_steps=-1, max_epochs=10, limit_val_batches=0)
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 4 and lora.merged == ["down", "up"]
    assert not lora_layers(module.model)  # adapters merged and unwrapped: a plain compressed model again
    lowrank = {n: m for n, m in module.model.named_modules() if isinstance(m, LowRankLinear)}
    assert len(lowrank) == len(module.plan["layers"]) == 14  # the language model's attention + MLP layers
    assert len(snap.weights) == 2 * 14
    changed = [n for n, w in snap.weights.items() if not torch.equal(module.model.get_submodule(n).weight, w)]
    assert {n.rsplit(".", 1)[-1] for n in changed} == {"down", "up"}  # both stages moved their factors
    for name, layer in lowrank.items():
        assert layer.down.weight.shape == snap.weights[f"{name}.down"].shape  # ranks unchanged by the merges
    assert torch.isfinite(module.spec.training_loss(module.model, next(iter(dm.train_dataloader()))))


@pytest.mark.slow
@pytest.mark.parametrize("config", ["tiny_llava", "tiny_llava_next", "tiny_idefics3"])
def test_tiny_configs_run_through_the_cli(config, tmp_path, monkeypatch):
    """The shipped CPU configs run end to end through train.py's CLI and write a checkpoint and summary."""
    import json
    from pathlib import Path

    from lightning_modules.cli import CompressionCLI

    root = Path(__file__).resolve().parents[1]
    monkeypatch.chdir(root)
    monkeypatch.setenv("SVD_VGGT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr("sys.argv", ["train.py"])
    CompressionCLI(args=["fit", "--config", f"configs/vlm/{config}.yaml",
                         "--trainer.logger.init_args.save_dir", str(tmp_path)])
    summary = json.loads(next(tmp_path.rglob("summary.json")).read_text())
    assert Path(summary["checkpoint"]).is_file()
    assert summary["compression"]["allocation"] == "gradient"
    assert all(math.isfinite(v) and 0 <= v <= 100 for k, v in summary["test"].items() if "/accuracy/" in k)


@pytest.mark.parametrize("family, dataset", CASES)
def test_answer_loss_scores_only_answer_tokens_with_the_head_on_them_alone(family, dataset, roots):
    """The training loss runs the output head on the answer positions only; it equals the mean cross-entropy of the
    full logits over the tokens whose label is set, and its gradient reaches the projector unchanged."""
    import torch.nn.functional as F

    dm = _datamodule(family, dataset, roots[dataset])
    spec = VLMSpec(f"tiny-{family}", trainable=["projector"])
    model = spec.build()
    batch = next(iter(dm.train_dataloader()))
    logits = model(**model_inputs(batch), use_cache=False).logits
    target = batch["labels"][:, 1:]
    assert 0 < int((target != -100).sum()) < target.numel() // 2  # a few answer tokens among many prompt tokens
    reference = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                ignore_index=-100)
    reference.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    model.zero_grad()
    loss = spec.training_loss(model, batch)
    loss.backward()
    assert torch.allclose(loss, reference, rtol=1e-5, atol=1e-6)
    assert grads and all(torch.allclose(p.grad, grads[n], rtol=1e-4, atol=1e-7)
                         for n, p in model.named_parameters() if p.requires_grad)


def test_answer_nll_per_example_is_that_example_alone(roots):
    """``VLMSpec.answer_nll`` (likelihood scoring) gives every example of a padded batch the answer NLL and token count
    it has when run alone, and its sum is the training loss's numerator."""
    from dataclasses import replace

    spec = VLMSpec("tiny-llava")
    model = spec.build().eval()
    collate = VQACollator(spec.processor, "train")
    examples = read_scienceqa(roots["scienceqa"], "train")[:3]
    examples = [replace(e, target=t) for e, t in zip(examples, ["B", "The answer is C.", "a longer answer, B"])]
    with torch.no_grad():
        batch = collate(examples)
        nll, count = spec.answer_nll(model, batch)
        alone = [spec.answer_nll(model, collate([e])) for e in examples]
        total, tokens = spec._nll(model, batch)
    assert batch["attention_mask"].sum(1).unique().numel() == 3  # three lengths: padding is exercised
    torch.testing.assert_close(nll, torch.cat([a[0] for a in alone]), rtol=1e-4, atol=1e-4)
    assert count.tolist() == [int(a[1]) for a in alone] and count[1] > count[0]
    torch.testing.assert_close(total, nll.sum())
    assert int(tokens) == int(count.sum())


def test_projector_trains_at_its_own_learning_rate():
    """LLaVA's ``mm_projector_lr``: with the projector and the language model trainable, the optimizer holds the
    projector's parameters at their own rate and every other trainable parameter at the run's rate."""
    spec = VLMSpec("tiny-llava", trainable=["projector", "language_model"], projector_learning_rate=1e-2)
    module = CompressionModule(spec, learning_rate=1e-4)
    module.configure_model()
    groups = module.configure_optimizers().param_groups
    projector = {id(p) for p in module.model.model.multi_modal_projector.parameters()}
    assert [g["lr"] for g in groups] == [1e-2, 1e-4]
    assert {id(p) for p in groups[0]["params"]} == projector
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    assert {id(p) for p in groups[1]["params"]} == {id(p) for p in trainable} - projector
    assert len(groups[1]["params"]) == len(trainable) - len(projector) > 0
    with pytest.raises(ValueError, match="projector does not train"):
        VLMSpec("tiny-llava", trainable=["language_model"], projector_learning_rate=1e-2)


def test_cosine_schedule_warms_up_then_decays_to_zero_per_step():
    """``lr_schedule: cosine`` (LLaVA's): linear warm-up over ceil(warmup_ratio * max_steps) steps, then a cosine to 0
    at max_steps, stepped every optimizer step; constant keeps the plain optimizer."""
    spec = VLMSpec("tiny-llava", trainable=["projector"])
    module = CompressionModule(spec, learning_rate=1e-2, lr_schedule="cosine", warmup_ratio=0.1)
    module.configure_model()
    module.trainer = Trainer(accelerator="cpu", max_steps=20, logger=False, enable_progress_bar=False,
                             enable_model_summary=False, enable_checkpointing=False)
    config = module.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert config["lr_scheduler"]["interval"] == "step"
    rates = []
    for _ in range(20):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert rates[:2] == pytest.approx([5e-3, 1e-2])  # warm-up: 2 steps
    assert rates[2] == pytest.approx(1e-2) and rates[11] == pytest.approx(5e-3)  # cos(pi/2) halfway through decay
    assert all(a > b for a, b in zip(rates[2:], rates[3:])) and rates[-1] == pytest.approx(1e-2 * 0.5 * (1 + math.cos(
        math.pi * 17 / 18)))
    constant = CompressionModule(VLMSpec("tiny-llava", trainable=["projector"]), learning_rate=1e-2)
    constant.configure_model()
    assert isinstance(constant.configure_optimizers(), torch.optim.AdamW)
    with pytest.raises(ValueError, match="lr_schedule"):
        CompressionModule(spec, lr_schedule="linear")
