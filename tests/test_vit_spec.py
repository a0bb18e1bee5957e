"""ViTSpec: targets, joint q/k/v groups, feature distillation, probes; compression + U/V LoRA through Lightning."""

from __future__ import annotations

import pytest
import torch
from fixtures_vit import tiny_clip, tiny_dinov2
from lightning.pytorch import Trainer
from test_vit_data import write_digits, write_fashion

from compression import Recipe, collect_stats, compress_
from data.images import ImageProbeDataModule
from lightning_modules import CompressionModule
from lightning_modules.vit_spec import ViTSpec
from models.vit.pretrained import encoder_for

pytestmark = pytest.mark.usefixtures("one_thread")


def dino_encoder(seed: int = 0):
    return encoder_for("dinov2", tiny_dinov2(seed)).eval()


def clip_encoder(seed: int = 0):
    return encoder_for("clip", tiny_clip(seed)).eval()


@pytest.mark.parametrize("make", [dino_encoder, clip_encoder])
def test_targets_groups_and_distillation_loss(make) -> None:
    spec = ViTSpec(model=make())
    model = spec.build()
    targets = spec.default_targets(model)
    assert len(targets) == 2 * 6  # q, k, v, out, fc1, fc2 per block; the projection and patch conv stay dense
    groups = spec.joint_groups(model, targets)
    assert len(groups) == 2 and all(len(v) == 3 and v[0].endswith("q_proj") for v in groups.values())
    images = torch.rand(4, 1, 112, 112)  # a multiple of both patch sizes, 14 and 16
    with torch.no_grad():
        assert float(spec.training_loss(model, {"images": images})) < 1e-6  # the dense model is its reference
        stats = collect_stats(model, targets, [{"images": images}], forward=spec.calibration_forward)
    compress_(model, Recipe("svd", ratio=0.6, targets=targets), stats, family=spec)
    with torch.no_grad():
        assert float(spec.training_loss(model, {"images": torch.rand(4, 1, 112, 112)})) > 1e-3
    assert spec.teacher is not model and "LowRank" not in repr(spec.teacher)  # the reference stayed dense


def test_evaluate_fills_the_probe_metric() -> None:
    spec = ViTSpec(model=dino_encoder(), knn_k=3)
    model = spec.build()
    metrics = spec.make_metrics()
    g = torch.Generator().manual_seed(0)
    for probe in (True, False):
        labels = torch.arange(8) % 2
        images = torch.rand(8, 1, 28, 28, generator=g) * 0.2 + 0.8 * labels[:, None, None, None]  # 2 classes
        loss = spec.evaluate(model, {"images": images, "labels": labels, "probe_train": torch.full((8,), probe)},
                             metrics)
        assert float(loss) < 1e-6
    out = spec.compute_metrics(metrics)
    assert float(out["feature_cos"]) == pytest.approx(1.0, abs=1e-6)
    assert float(out["knn_acc"]) == 1.0 and float(out["probe_acc"]) == 1.0


def _data(tmp_path) -> ImageProbeDataModule:
    write_fashion(tmp_path / "fm", n_train=200, n_test=40)
    write_digits(tmp_path / "digits.png")
    return ImageProbeDataModule(image_size=28, calibration_images=16, train_images=64, probe_images=40,
                                val_images=8, test_images=24, batch_size=8, fashion_root=str(tmp_path / "fm"),
                                digits_path=str(tmp_path / "digits.png"))


def _fit(tmp_path, lora_steps: list[int] | None, **recipe) -> dict[str, float]:
    # vanilla SVD: on this tiny random model SVD-LLM at 0.6 is already within 1e-3 of the dense features
    lora = {"steps": lora_steps, "r": 4, "alpha": 8, "dropout": 0.0, "learning_rate": [1e-2, 1e-2]} if lora_steps \
        else {}
    recipe = Recipe(**{"method": "svd", "ratio": 0.6, **recipe}, calibration={"progress": False}, lora=lora)
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=-1 if lora_steps else 0, max_epochs=100,
                      logger=False, enable_progress_bar=False, enable_model_summary=False,
                      num_sanity_val_steps=0, limit_val_batches=0, enable_checkpointing=False)
    module = CompressionModule(ViTSpec(model=dino_encoder()), compression=recipe, learning_rate=1e-2)
    dm = _data(tmp_path)
    trainer.fit(module, datamodule=dm)
    results = trainer.test(module, datamodule=dm, verbose=False)[0]
    results["joint_latents"] = sum(1 for n, _ in module.model.named_modules() if n.endswith("qkv_latent"))
    return results


def test_compress_and_distillation_lora_through_lightning(tmp_path) -> None:
    compressed = _fit(tmp_path, None)
    recovered = _fit(tmp_path, [8, 8])
    assert compressed["joint_latents"] == 0
    for name in ("fashion_mnist", "digits"):
        assert {f"test/{k}/{name}" for k in ("feature_cos", "knn_acc", "probe_acc")} <= set(compressed)
        assert compressed[f"test/feature_cos/{name}"] < 0.98  # seen: 0.960 / 0.955
        # distillation on unlabelled Fashion-MNIST images brings the features back towards the dense ones
        # (seen: 0.998 / 0.992; the digits were never trained on)
        assert recovered[f"test/feature_cos/{name}"] > compressed[f"test/feature_cos/{name}"] + 0.02


def test_sensitivity_importance_estimates_each_components_feature_change() -> None:
    """``mean_ε (σ_i u_iᵀ G_ε v_i)²`` over Gaussian probes ε = ‖Δf_i‖² / ‖f_d‖², the first-order squared feature
    change from removing component i (checked against central finite differences in float64)."""
    from compression import gradient_importance

    spec = ViTSpec(model=dino_encoder().double())
    model = spec.build()
    name = "model.encoder.layer.1.mlp.fc2"
    x = torch.rand(1, 1, 28, 28, dtype=torch.float64)
    probes = 400
    batches = [{"images": x, "probe_seed": torch.tensor([s])} for s in range(probes)]
    importance = gradient_importance(model, [name], batches, spec.training_loss, "svd", None)[name]
    layer = model.get_submodule(name)
    w = layer.weight.detach().clone()
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    with torch.no_grad():
        ref = model(x)
        for i in range(3):
            step = 1e-4 * s[i] * torch.outer(u[:, i], vh[i])
            layer.weight.copy_(w + step)
            up = model(x)
            layer.weight.copy_(w - step)
            down = model(x)
            layer.weight.copy_(w)
            change = (up - down) / 2e-4  # d f / d t along W + t σ_i u_i v_iᵀ: the first-order Δf_i
            exact = float(change.square().sum() / ref.square().sum())
            assert float(importance[i]) == pytest.approx(exact, rel=0.3)  # 400 probes: ~7 % standard error


def test_joint_qkv_with_gradient_allocation_through_lightning(tmp_path) -> None:
    """QSVD on a ViT: joint q/k/v groups from the layout, ranks from the probe-loss gradient importance."""
    out = _fit(tmp_path, None, method="svd_llm", joint_qkv=True, allocation="gradient", dense_above_break_even=True)
    assert out["joint_latents"] == 2  # one shared down projection per block
    assert 0.9 < out["test/feature_cos/fashion_mnist"] < 1.0
