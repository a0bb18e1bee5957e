"""VGGT-S training pieces: the ``small`` spec config, a pretrained DINOv2 patch embed loaded and frozen,
2-to-8-view synthetic training scenes, and the real-set evaluation path (on format fixtures)."""

from __future__ import annotations

import json

import pytest
import torch
from fixtures_vit import tiny_dinov2
from safetensors.torch import save_file

from benchmarks.vggt_s_eval import baseline_predictor, batched, model_predictor, score_set
from data.multiview.datamodule import MultiViewDataModule
from data.multiview.pairs import GrafPair, MotorcyclePair
from data.multiview.synthetic import SyntheticMultiViewDataset
from data.multiview.visp import CastleSimuDataset
from lightning_modules.vggt_spec import VGGTSpec
from metrics.correspondence import MatchingEPE, pointmap_matches
from models.vggt import VGGTConfig
from tests.fixtures_geometry import write_graf, write_visp

pytestmark = pytest.mark.usefixtures("one_thread")


def test_small_config_is_vggt_s() -> None:
    assert VGGTSpec(config="small").model_config() == VGGTConfig.small()
    assert VGGTSpec(config="small", config_overrides={"init_values": 1.0}).model_config().init_values == 1.0
    with pytest.raises(ValueError, match="'tiny', 'small' or '1b'"):
        VGGTSpec(config="base")


def _cached_dinov2(folder, hf) -> str:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"kind": "dinov2", "config": {
        "hidden_size": hf.config.hidden_size, "num_hidden_layers": hf.config.num_hidden_layers,
        "num_attention_heads": hf.config.num_attention_heads, "patch_size": 14, "image_size": hf.config.image_size,
        "layer_norm_eps": 1e-6, "layerscale_value": 1.0}}))
    save_file({k: v.contiguous() for k, v in hf.state_dict().items()}, folder / "model.safetensors")
    return str(folder)


def test_pretrained_backbone_is_loaded_and_frozen(tmp_path) -> None:
    hf = tiny_dinov2(width=64)
    overrides = {"img_size": 56, "embed_dim": 64, "backbone_register_tokens": 0, "backbone_interp_antialias": False,
                 "backbone_num_heads": 1, "num_heads": 4}
    spec = VGGTSpec(config="tiny", config_overrides=overrides, backbone_weights=_cached_dinov2(tmp_path / "vit", hf),
                    freeze_backbone=True, count_flops=False)
    model = spec.build()
    x = torch.rand(2, 3, 56, 56)
    with torch.no_grad():
        ref = hf(pixel_values=(x - torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1))
                 / torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)).last_hidden_state[:, 1:]
        torch.testing.assert_close(model.aggregator.patch_embed((x - model.aggregator._mean[0])
                                                                / model.aggregator._std[0]), ref, rtol=1e-5, atol=1e-5)
    frozen = {n: p.detach().clone() for n, p in model.aggregator.patch_embed.named_parameters()}
    assert frozen and not any(p.requires_grad for p in model.aggregator.patch_embed.parameters())
    batch = next(iter(MultiViewDataModule(num_views=2, image_size=(56, 56), train_scenes=1, batch_size=1)
                      .train_dataloader()))
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    before = model.aggregator.frame_blocks[0].attn.qkv.weight.detach().clone()
    spec.training_loss(model, batch).backward()
    opt.step()
    assert not torch.equal(before, model.aggregator.frame_blocks[0].attn.qkv.weight)
    for name, p in model.aggregator.patch_embed.named_parameters():
        assert p.grad is None and torch.equal(p, frozen[name]), name


def test_variable_view_counts_are_seeded_and_bounded() -> None:
    ds = SyntheticMultiViewDataset(40, num_views=8, image_size=(28, 28), min_views=2)
    counts = [ds.views_of(i) for i in range(40)]
    assert min(counts) >= 2 and max(counts) <= 8 and len(set(counts)) >= 4
    assert counts == [SyntheticMultiViewDataset(40, 8, (28, 28), min_views=2).views_of(i) for i in range(40)]
    assert ds[3]["images"].shape[0] == counts[3]
    dm = MultiViewDataModule(num_views=8, min_views=2, image_size=(28, 28), train_scenes=4, test_scenes=2)
    assert dm.dataset("test").views_of(0) == 8 and dm.dataset("train").min_views == 2
    with pytest.raises(ValueError, match="batch_size: 1"):
        MultiViewDataModule(num_views=8, min_views=2, batch_size=2)
    with pytest.raises(ValueError, match="exceeds num_views"):
        SyntheticMultiViewDataset(4, num_views=4, min_views=6)


def test_pointmap_matching_recovers_a_known_shift() -> None:
    H, W = 12, 16
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    p0 = torch.stack([u, v, torch.ones_like(u)], -1)
    p1 = torch.stack([u + 3, v - 2, torch.ones_like(u)], -1)  # pixel (x, y) of view 1 sees point (x+3, y-2)
    queries = torch.tensor([[5.0, 6.0], [10.0, 3.0], [7.5, 4.0]])
    matches = pointmap_matches(p0, p1, queries)
    torch.testing.assert_close(matches[:2], torch.tensor([[2.0, 8.0], [7.0, 5.0]]))
    metric = MatchingEPE()
    metric.update(matches[:2], torch.tensor([[2.0, 8.0], [7.0, 9.0]]))
    out = metric.compute()
    assert float(out["epe"]) == pytest.approx(2.0) and float(out["pck@3"]) == pytest.approx(50.0)


def test_real_set_scoring_on_fixtures(tmp_path) -> None:
    write_visp(tmp_path / "visp")
    write_graf(tmp_path / "graf")
    castle = CastleSimuDataset(tmp_path / "visp", num_views=3, image_size=(28, 42), stride=1, num_samples=2)
    graf = GrafPair(tmp_path / "graf", image_size=(28, 42), num_points=16)
    # the baseline of identity poses / constant depth / identity matches, through the same metric code
    base = score_set(baseline_predictor, castle, "castle_simu")
    assert set(base) >= {"camera_auc30", "depth_abs_rel", "points_chamfer"}
    assert 0.0 < base["depth_abs_rel"] < 1.0
    g = score_set(baseline_predictor, graf, "graf")
    sample = graf[0]
    identity_epe = (sample["query_points"] - sample["target_points"]).norm(dim=-1).mean()
    assert g["match_epe"] == pytest.approx(float(identity_epe), rel=1e-5) and "camera_auc30" not in g
    # the model path: a forward on real-format views, every metric finite
    spec = VGGTSpec(config="tiny", count_flops=False)
    model = spec.build().eval()
    out = model_predictor(model, spec)(batched(castle[0]))
    assert out["depth"].shape == (1, 3, 28, 42, 1)
    assert torch.isfinite(torch.tensor(list(score_set(model_predictor(model, spec), castle, "castle_simu")
                                            .values()))).all()
    with pytest.raises(FileNotFoundError, match="scikit-image"):
        MotorcyclePair(tmp_path / "missing")
