"""The chunked LM distillation loss (lightning_modules/lm_distill.py) against the full-logits one: same values and
gradients, and the decoder / head split refused where it does not reproduce the model's logits."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

from lightning_modules.lm_distill import (
    _SPLITS,
    chunked_distillation_loss,
    full_logits_distillation_loss,
    head_split,
)
from lightning_modules.specs import CausalLMSpec

pytestmark = pytest.mark.usefixtures("one_thread")


def _batch(rows: int = 3, length: int = 40) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding: not scored by the KL, still by the NLL (labels = input ids there)
    labels = ids.clone()
    labels[1, 10:20] = -100  # scored by the KL only
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _student() -> torch.nn.Module:
    student = make_tiny_llama(seed=3).train()
    student.get_output_embeddings().weight.requires_grad_(False)  # tied: the embedding stays frozen
    return student


def _losses_and_grads(loss_fn, student, teacher, batch, temperature, weight, autocast):
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        distill, task = loss_fn(student, teacher, batch, temperature)
        loss = weight * distill + (1 - weight) * task
    params = [p for p in student.parameters() if p.requires_grad]
    return float(distill), float(task), torch.autograd.grad(loss, params)


@pytest.mark.parametrize("temperature", [1.0, 2.0])
@pytest.mark.parametrize("weight", [1.0, 0.3])
def test_chunked_equals_full_logits_in_float32(temperature, weight):
    teacher, student, batch = make_tiny_llama(), _student(), _batch()
    chunked = _losses_and_grads(lambda *a: chunked_distillation_loss(*a, chunk=7), student, teacher, batch,
                                temperature, weight, autocast=False)
    full = _losses_and_grads(full_logits_distillation_loss, student, teacher, batch, temperature, weight,
                             autocast=False)
    assert chunked[0] == pytest.approx(full[0], rel=2e-5)
    assert chunked[1] == pytest.approx(full[1], rel=2e-6)
    for a, b in zip(chunked[2], full[2], strict=True):
        assert float((a - b).abs().max()) <= 2e-5 * float(b.abs().max())


def test_chunked_matches_full_logits_under_bf16_autocast():
    """The head GEMMs in bf16 as autocast would run them; the rest in float32: the values agree to float32
    rounding of the same bf16 logits, the gradients to bf16 rounding of the logit gradients."""
    teacher, student, batch = make_tiny_llama(), _student(), _batch()
    chunked = _losses_and_grads(lambda *a: chunked_distillation_loss(*a, chunk=16), student, teacher, batch, 1.0,
                                0.5, autocast=True)
    full = _losses_and_grads(full_logits_distillation_loss, student, teacher, batch, 1.0, 0.5, autocast=True)
    assert chunked[0] == pytest.approx(full[0], rel=1e-4)
    assert chunked[1] == pytest.approx(full[1], rel=1e-5)
    for a, b in zip(chunked[2], full[2], strict=True):
        assert float((a - b).abs().max()) <= 2e-2 * float(b.abs().max())


def test_the_spec_uses_the_chunked_path_and_a_teacher_copy_has_zero_kl(monkeypatch):
    import lightning_modules.lm_distill as lm_distill

    teacher, batch = make_tiny_llama(), _batch()
    calls = []
    spec = CausalLMSpec(model=teacher)
    original = lm_distill._ChunkedDistillation.apply
    monkeypatch.setattr(lm_distill._ChunkedDistillation, "apply", lambda *a: calls.append(1) or original(*a))
    distill, task = spec.distillation_loss(make_tiny_llama().requires_grad_(False), teacher, batch)
    assert calls == [1]
    assert float(distill) == pytest.approx(0.0, abs=1e-6)
    assert float(task) == pytest.approx(float(spec.training_loss(teacher, batch)), rel=1e-6)


def test_a_model_with_post_processed_logits_falls_back_to_the_full_logits():
    """A model whose forward scales its logits (as soft-capping or ``logit_scale`` models do): ``head(decoder(x))``
    is not its logits, so the split is refused and the loss is the full-logits one."""
    teacher = make_tiny_llama()
    base = type(teacher)

    class ScaledLogits(base):
        def forward(self, *args, **kwargs):
            out = super().forward(*args, **kwargs)
            out.logits = out.logits * 0.5
            return out

    student = make_tiny_llama(seed=3)
    student.__class__ = ScaledLogits
    batch = _batch()
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    assert head_split(student, kwargs) is None
    assert head_split(teacher, kwargs) is not None
    assert chunked_distillation_loss(student, teacher, batch) is None
    spec_loss = CausalLMSpec(model=teacher).distillation_loss(student, teacher, batch)
    full = full_logits_distillation_loss(student, teacher, batch)
    assert float(spec_loss[0]) == pytest.approx(float(full[0]), rel=1e-6)


def test_the_split_check_leaves_every_module_in_its_mode():
    student, batch = _student(), _batch()
    student.model.layers[0].eval()  # a part in eval mode inside a model in train mode stays so
    kwargs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}
    before = {name: m.training for name, m in student.named_modules()}
    assert head_split(student, kwargs) is not None
    assert {name: m.training for name, m in student.named_modules()} == before
    assert not before["model.layers.0"] and before[""]


def test_a_trained_head_or_a_model_without_the_split_uses_the_full_logits():
    teacher, student, batch = make_tiny_llama(), make_tiny_llama(seed=3), _batch()
    student.get_output_embeddings().weight.requires_grad_(True)
    assert chunked_distillation_loss(student, teacher, batch) is None  # the head's gradient is not formed here
    plain = torch.nn.Linear(4, 4)
    assert head_split(plain, {}) is None
    assert plain in _SPLITS  # checked once per model


@pytest.mark.parametrize("preset", [None, "100"])
def test_importing_compression_enlarges_the_onednn_kernel_cache_unless_the_user_set_it(preset):
    import os
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    if preset is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = preset
    code = "import os, compression; print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert out.stdout.strip() == (preset or "8192")
