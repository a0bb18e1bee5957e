"""Compressing a tiny VGGT with every method: finite outputs, intact shapes, exact plan round trips, groups.

Tiny random-init VGGT (``VGGTSpec()``: embed 64, depth 4), 3 views of 28x42, calibration on
synthetic scenes through ``VGGTSpec.calibration_forward`` (frame and global attention both fed).
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import (
    LowRankLinear,
    Recipe,
    apply_plan,
    build_method,
    collect_stats,
    compress_,
    gradient_allocation,
    gradient_importance,
    rank_for_ratio,
)
from lightning_modules import VGGTSpec
from metrics.flops import vggt_flops
from models.vggt import VGGT
from tests.test_vggt_spec import make_batch

OUTPUTS = ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf")


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    spec = VGGTSpec()
    model = spec.build().eval()
    names = spec.default_targets(model)
    calib = [make_batch(num_scenes=2, num_views=3, seed=s) for s in (11, 13)]
    with torch.no_grad():
        stats = collect_stats(model, names, calib, forward=spec.calibration_forward)
        dense = model(spec.images(calib[0]))
    return spec, model, names, stats, calib, dense


def qsvd_ranks(spec, model, names, stats, calib, ratio):
    samples = [{k: v[i:i + 1] if torch.is_tensor(v) else v[i:i + 1] for k, v in b.items()} for b in calib for i in
               range(2)]
    imp = gradient_importance(model, names, samples, spec.training_loss, build_method("svd_llm"), stats)
    shapes = {n: (model.get_submodule(n).out_features, model.get_submodule(n).in_features) for n in names}
    return gradient_allocation(imp, shapes, ratio=ratio).ranks


@pytest.mark.parametrize("method,allocation", [("svd", "uniform"), ("asvd", "uniform"), ("svd_llm", "uniform"),
                                               ("svd_llm_v2", "v2"), ("svd_llm", "gradient")])
def test_every_method_keeps_outputs_finite_and_shapes_intact(setup, method, allocation):
    spec, dense_model, names, stats, calib, dense = setup
    model = copy.deepcopy(dense_model)
    ranks = qsvd_ranks(spec, model, names, stats, calib, 0.3) if allocation == "gradient" else {}
    cfg = Recipe(method, ratio=0.3, allocation=allocation, targets=names,
                 calibration={"gradient_batches": None, "per_sample": True})
    report = compress_(model, cfg, stats, family=spec, batches=calib)
    assert len(report.layers) == len(names) == 44  # 11 blocks x (qkv, proj, fc1, fc2)
    # one parameter budget for every method (svd_llm_v2 may keep fewer: it drops directions the
    # calibration Gram does not span, e.g. in the camera trunk that sees 4 tokens per frame)
    assert report.params_ratio >= 0.3 - 0.02
    if allocation == "gradient":
        assert {r.name: r.rank for r in report.layers} == ranks
    assert all(isinstance(model.get_submodule(n), LowRankLinear) for n in names)
    with torch.no_grad():
        out = model(spec.images(calib[0]))
    for key in OUTPUTS:
        assert out[key].shape == dense[key].shape, key
        assert torch.isfinite(out[key]).all(), key
    assert len(out["pose_enc_list"]) == len(dense["pose_enc_list"])
    assert (out["depth"] > 0).all() and (out["depth_conf"] >= 1).all()
    # a fresh model rebuilt from the plan (no statistics) takes the state dict strictly: identical outputs
    fresh = VGGT(spec.model_config(), enable_track=False).eval()
    apply_plan(fresh, report.plan)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        again = fresh(spec.images(calib[0]))
    for key in OUTPUTS:
        torch.testing.assert_close(again[key], out[key], rtol=0, atol=0)


def test_whitening_beats_plain_svd_on_the_calibration_outputs(setup):
    """SVD-LLM minimises each layer's calibration output error: the whole model's drift is smaller too."""
    spec, dense_model, names, stats, calib, dense = setup
    drift = {}
    for method in ("svd", "svd_llm"):
        model = copy.deepcopy(dense_model)
        compress_(model, Recipe(method, ratio=0.4, targets=names), stats)
        with torch.no_grad():
            out = model(spec.images(calib[0]))
        drift[method] = float((out["world_points"] - dense["world_points"]).norm() / dense["world_points"].norm())
    assert drift["svd_llm"] < drift["svd"]


def test_per_group_ratios_with_overrides(setup):
    spec, dense_model, names, stats, _, _ = setup
    model = copy.deepcopy(dense_model)
    overrides = {"aggregator.global_blocks.*": {"ratio": 0.6}, "camera_head.trunk.*": {"rank": 4}}
    report = compress_(model, Recipe("svd_llm", ratio=0.2, targets=names, overrides=overrides), stats)
    for r in report.layers:
        m, n = r.out_features, r.in_features
        if r.name.startswith("aggregator.global_blocks."):
            assert r.rank == rank_for_ratio(m, n, 0.6)
        elif r.name.startswith("camera_head.trunk."):
            assert r.rank == 4
        else:
            assert r.rank == rank_for_ratio(m, n, 0.2)


def test_target_groups_select_and_dpt_projections_become_equal_linears():
    torch.manual_seed(0)
    spec = VGGTSpec(target_groups=["global", "dpt_projections"])
    model = spec.build().eval()
    names = spec.default_targets(model)
    assert sorted({spec.target_group(n) for n in names}) == ["dpt_projections", "global"]
    assert [n for n in names if "projects" in n] == [f"{h}.projects.{k}" for h in ("point_head", "depth_head")
                                                       for k in range(4)]
    conv_model = VGGTSpec().build().eval()  # same seed: the same weights with 1x1 convs
    conv_model.load_state_dict({k: v.reshape(conv_model.state_dict()[k].shape) for k, v in model.state_dict().items()})
    images = spec.images(make_batch(num_scenes=1, num_views=2))
    with torch.no_grad():
        a, b = model(images), conv_model(images)
    for key in OUTPUTS:
        torch.testing.assert_close(a[key], b[key], rtol=1e-5, atol=1e-5)
    report = compress_(model, Recipe("svd", ratio=0.3, targets=names))
    assert {r.name for r in report.layers} == set(names)
    with torch.no_grad():
        assert torch.isfinite(model(images)["depth"]).all()
    with pytest.raises(ValueError, match="target_groups"):
        VGGTSpec(target_groups=["tracker"])


def test_evaluate_reports_gflops_of_the_model_as_evaluated(setup):
    spec, dense_model, names, stats, calib, _ = setup
    model = copy.deepcopy(dense_model)
    batch = calib[0]
    metrics = spec.make_metrics()
    spec.evaluate(model, batch, metrics)
    dense_gflops = float(spec.compute_metrics(metrics)["gflops"])
    assert dense_gflops == pytest.approx(vggt_flops(model, num_frames=3, image_hw=(28, 42))["total"])
    compress_(model, Recipe("svd_llm", ratio=0.4, targets=names), stats)
    metrics.reset()
    assert metrics.gflops is None
    spec.evaluate(model, batch, metrics)
    got = spec.compute_metrics(metrics)
    assert float(got["gflops"]) == pytest.approx(vggt_flops(model, num_frames=3, image_hw=(28, 42))["total"])
    assert float(got["gflops"]) < dense_gflops
    assert "gflops" not in VGGTSpec(count_flops=False).compute_metrics(_scored(VGGTSpec(count_flops=False), model,
                                                                                batch))


def _scored(spec, model, batch):
    metrics = spec.make_metrics()
    spec.evaluate(model, batch, metrics)
    return metrics
