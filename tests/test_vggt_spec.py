"""VGGTSpec: GT normalisation, the multi-task loss, the metric path, default targets, the testbed."""

from __future__ import annotations

import math

import pytest
import torch

from compression import StatsCollector
from data.multiview.datamodule import MultiViewDataModule
from data.multiview.synthetic import render_sample
from lightning_modules import VGGTSpec
from lightning_modules.vggt_spec import (
    TARGET_PREFIXES,
    TESTBED_WEIGHTS,
    baseline_predictions,
    ground_truth_predictions,
    normalize_ground_truth,
    valid_pixels,
)
from models.vggt import VGGT, VGGTConfig, extri_intri_to_pose_encoding, load_official_state_dict


def make_batch(num_scenes: int = 2, num_views: int = 3, hw: tuple[int, int] = (28, 42), seed: int = 7) -> dict:
    samples = [render_sample(seed + i, num_views, hw) for i in range(num_scenes)]
    return {k: torch.stack([s[k] for s in samples]) for k in samples[0] if k != "scene"}


@pytest.fixture(scope="module")
def batch() -> dict:
    return make_batch()


def test_gt_normalisation_first_camera_identity_unit_mean_distance(batch):
    valid = valid_pixels(batch)
    ext, points, depths, scale = normalize_ground_truth(batch["extrinsics"], batch["world_points"],
                                                        batch["depths"], valid)
    assert torch.allclose(ext[:, 0], torch.eye(3, 4).expand(2, 3, 4), atol=1e-6)
    for b in range(2):
        assert points[b][valid[b]].norm(dim=-1).mean() == pytest.approx(1.0, abs=1e-5)
    # the normalised cameras still see the normalised points at the normalised depths
    cam = torch.einsum("bsij,bshwj->bshwi", ext[..., :3], points) + ext[..., None, None, :, 3]
    assert torch.allclose(cam[..., 2][valid], depths[valid], atol=1e-4)
    assert torch.allclose(depths[valid], (batch["depths"] / scale.view(-1, 1, 1, 1))[valid], rtol=1e-5)
    # translations are scaled by the same s: relative camera distances shrink by s
    centre = lambda e: -(e[..., :3].transpose(-1, -2) @ e[..., 3:]).squeeze(-1)  # noqa: E731
    raw = (centre(batch["extrinsics"])[:, 1] - centre(batch["extrinsics"])[:, 0]).norm(dim=-1)
    assert torch.allclose((centre(ext)[:, 1] - centre(ext)[:, 0]).norm(dim=-1), raw / scale, rtol=1e-4)
    enc = extri_intri_to_pose_encoding(ext, batch["intrinsics"], (28, 42))
    assert torch.allclose(enc[:, 0, :7], torch.tensor([0, 0, 0, 0, 0, 0, 1.0]).expand(2, 7), atol=1e-6)


def test_perfect_prediction_scores_perfectly_and_has_zero_loss(batch):
    spec = VGGTSpec()
    metrics = spec.make_metrics()
    perfect = ground_truth_predictions(batch)
    spec.update_metrics(metrics, perfect, batch)
    out = {k: float(v) for k, v in spec.compute_metrics(metrics).items()}
    assert out["camera_auc30"] == pytest.approx(100.0)
    assert out["camera_rra30"] == out["camera_rta30"] == pytest.approx(100.0)
    assert out["depth_abs_rel"] < 1e-6 and out["depth_delta1.25"] == pytest.approx(1.0)
    assert out["points_chamfer"] < 1e-5
    terms = spec.loss_terms(perfect, batch)  # unit confidence: -α log 1 = 0
    assert all(abs(float(v)) < 1e-5 for v in terms.values())
    metrics.reset()
    spec.update_metrics(metrics, baseline_predictions(batch), batch)
    base = {k: float(v) for k, v in spec.compute_metrics(metrics).items()}
    assert base["camera_rta30"] == 0.0 and base["depth_abs_rel"] > 0.1


def test_loss_is_finite_and_decreases(batch):
    torch.manual_seed(0)
    spec = VGGTSpec(config_overrides={"frames_chunk_size": None})
    model = spec.build()
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(8):
        loss = spec.training_loss(model, batch)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    terms = spec.loss_terms(model(spec.images(batch)), batch)
    assert set(terms) == {"camera", "depth", "points", "total"}
    assert losses[-1] < losses[0] - 0.2 * abs(losses[0]), losses


def test_non_finite_loss_raises(batch):
    spec = VGGTSpec()
    nan_model = lambda images: {**ground_truth_predictions(batch), "depth": torch.full_like(  # noqa: E731
        batch["depths"][..., None], math.nan)}
    with pytest.raises(FloatingPointError, match="non-finite VGGT loss"):
        spec.training_loss(nan_model, batch)


def test_image_conventions_and_bad_arguments(batch):
    x = batch["images"]
    assert torch.allclose(VGGTSpec(image_convention="byte").images({"images": x * 255}), x, atol=1e-6)
    mean, std = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1), torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    assert torch.allclose(VGGTSpec(image_convention="imagenet").images({"images": (x - mean) / std}), x, atol=1e-5)
    with pytest.raises(ValueError, match="not a VGGTConfig field"):
        VGGTSpec(config_overrides={"embed_dimension": 8}).model_config()
    with pytest.raises(ValueError, match="testbed"):
        VGGTSpec(config="1b", weights="testbed")
    with pytest.raises(FileNotFoundError):
        VGGTSpec(weights="/nonexistent/vggt.safetensors").build()


def test_default_targets_are_exactly_the_transformer_linears():
    spec = VGGTSpec(enable_track=True)
    model = spec.build()
    names = spec.default_targets(model)
    blocks = (
        [f"aggregator.patch_embed.blocks.{i}" for i in range(2)]
        + [f"aggregator.frame_blocks.{i}" for i in range(4)]
        + [f"aggregator.global_blocks.{i}" for i in range(4)]
        + ["camera_head.trunk.0"]
    )
    expected = [f"{b}.{leaf}" for b in blocks for leaf in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    assert sorted(names) == sorted(expected)
    assert not any("track_head" in n or "out_proj" in n for n in names)
    mha = [n for n, m in model.named_modules() if isinstance(m, torch.nn.MultiheadAttention)]
    assert mha and all(n.startswith("track_head") for n in mha)
    assert all(n.startswith(TARGET_PREFIXES) for n in names)


def test_calibration_forward_feeds_frame_and_global_blocks(batch):
    spec = VGGTSpec()
    model = spec.build().eval()
    names = spec.default_targets(model)
    with torch.no_grad(), StatsCollector(model, names, with_gram=False) as collector:
        spec.calibration_forward(model, batch)
    B, S, P = 2, 3, 5 + 2 * 3
    assert collector.stats["aggregator.frame_blocks.0.attn.qkv"].count == B * S * P
    assert collector.stats["aggregator.global_blocks.3.mlp.fc2"].count == B * S * P
    assert collector.stats["camera_head.trunk.0.attn.qkv"].count > 0
    assert all(collector.stats[n].count > 0 for n in names)


def test_testbed_loads_strictly_and_beats_the_baselines():
    from safetensors.torch import load_file

    spec = VGGTSpec(weights="testbed")
    model = spec.build().eval()
    load_official_state_dict(VGGT(spec.model_config(), enable_track=False), load_file(str(TESTBED_WEIGHTS)))
    assert isinstance(model.config, VGGTConfig) and model.track_head is None
    dm = MultiViewDataModule(num_views=8, image_size=(56, 56), train_scenes=0, test_scenes=2, seed=0, batch_size=2)
    ours, base = spec.make_metrics(), spec.make_metrics()
    with torch.no_grad():
        for i, b in enumerate(dm.test_dataloader()):
            spec.evaluate(model, b, ours, i)
            spec.update_metrics(base, baseline_predictions(b), b)
    ours, base = spec.compute_metrics(ours), spec.compute_metrics(base)
    assert ours["depth_abs_rel"] <= 0.5 * base["depth_abs_rel"]
    assert ours["camera_auc30"] >= base["camera_auc30"] + 20
    assert ours["points_chamfer"] < base["points_chamfer"]


def test_saved_weights_reload_strictly_with_their_config(tmp_path):
    from lightning_modules.vggt_spec import save_vggt_weights

    torch.manual_seed(3)
    model = VGGTSpec(config_overrides={"embed_dim": 32}).build().eval()
    path = save_vggt_weights(model, tmp_path / "w.safetensors", {"num_views": 3})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.json", "w.safetensors"]  # no temporary left
    spec = VGGTSpec(weights=str(path), config_overrides={"embed_dim": 32})
    again = spec.build().eval()
    images = spec.images(make_batch(num_scenes=1, num_views=2))
    with torch.no_grad():
        torch.testing.assert_close(again(images)["depth"], model(images)["depth"], rtol=0, atol=0)
