"""Multi-view data: renderer consistency, determinism, DataModule batches, format loaders."""

from __future__ import annotations

import math

import pytest
import torch

from data.multiview.co3d import CO3DDataset
from data.multiview.common import ResizeCrop, check_image_size
from data.multiview.datamodule import MultiViewDataModule
from data.multiview.dtu import DTUDataset, read_pfm
from data.multiview.eth3d import ETH3DDataset
from data.multiview.geometry import (
    backproject_depth,
    camera_centers,
    look_at,
    matrix_to_quaternion,
    project_points,
    quaternion_to_matrix,
)
from data.multiview.synthetic import SyntheticMultiViewDataset, intersect, render_sample
from tests.fixtures_multiview import render_truth, upscale_intrinsics, write_co3d, write_dtu, write_eth3d


def _backprojection_error(sample: dict) -> torch.Tensor:
    pts = backproject_depth(sample["depths"].double(), sample["intrinsics"].double(), sample["extrinsics"].double())
    return (pts - sample["world_points"].double()).norm(dim=-1)[sample["masks"]]


# ------------------------------------------------------------------ geometry
def test_quaternion_round_trip_and_look_at_is_a_rotation():
    eye, target = torch.tensor([3.0, -4.0, 2.0], dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    e = look_at(eye, target, roll=0.2)
    rot = e[:, :3]
    torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=torch.float64))
    assert torch.det(rot) == pytest.approx(1.0)
    torch.testing.assert_close(camera_centers(e), eye)
    # the target projects onto the optical axis (camera +z)
    cam = rot @ target + e[:, 3]
    assert cam[0] == pytest.approx(0.0, abs=1e-12) and cam[1] == pytest.approx(0.0, abs=1e-12) and cam[2] > 0
    torch.testing.assert_close(quaternion_to_matrix(matrix_to_quaternion(rot)), rot)


def test_resize_crop_intrinsics_match_an_analytic_render_at_half_resolution():
    k_low = render_truth(1, 1, (28, 28))["intrinsics"][0]
    k_high = upscale_intrinsics(k_low, 2)
    torch.testing.assert_close(ResizeCrop.cover((56, 56), (28, 28)).intrinsics(k_high), k_low)
    rc = ResizeCrop.cover((84, 112), (84, 84))  # crop only: 14 px from the left
    assert rc.resized == (84, 112) and rc.left == 14
    with pytest.raises(ValueError, match="multiples of 14"):
        check_image_size((100, 112))


# ------------------------------------------------------------------ synthetic
def test_synthetic_backprojection_reproduces_world_points():
    sample = render_sample(7, 4, (56, 70))
    assert sample["masks"].float().mean() > 0.5
    assert _backprojection_error(sample).max() < 1e-4


def test_synthetic_cross_view_projection_agrees_with_depth_when_visible():
    truth = render_truth(11, 3, (56, 56))
    e, k = truth["extrinsics"], truth["intrinsics"]
    for i, j in [(0, 1), (1, 2), (2, 0)]:
        pts = truth["world_points"][i][truth["masks"][i]].double()
        uv, z = project_points(pts, k[j], e[j])
        inside = (z > 0) & (uv[:, 0] > -0.5) & (uv[:, 0] < 55.5) & (uv[:, 1] > -0.5) & (uv[:, 1] < 55.5)
        pts, uv, z = pts[inside], uv[inside], z[inside]
        centre = camera_centers(e[j])
        t_hit, _, _, _ = intersect(truth["scene"], centre.expand_as(pts).contiguous(), pts - centre)
        visible = t_hit > 1 - 1e-6  # nothing in front of the point along the ray from camera j
        assert visible.float().mean() > 0.3
        # Inverse depth is affine in pixel coordinates on a plane: interpolate it bilinearly.
        uv, z = uv[visible], z[visible]
        inv = torch.where(truth["masks"][j], 1 / truth["depths"][j].double(), torch.zeros(()).double())
        inv = torch.nn.functional.pad(inv, (0, 1, 0, 1))
        u0, v0 = uv[:, 0].floor().long().clamp(0, 54), uv[:, 1].floor().long().clamp(0, 54)
        fu, fv = uv[:, 0] - u0, uv[:, 1] - v0
        corners = torch.stack([inv[v0, u0], inv[v0, u0 + 1], inv[v0 + 1, u0], inv[v0 + 1, u0 + 1]])
        interp = (corners[0] * (1 - fu) + corners[1] * fu) * (1 - fv) + (corners[2] * (1 - fu) + corners[3] * fu) * fv
        ok = (corners > 0).all(0)
        rel = (1 / interp[ok] - z[ok]).abs() / z[ok]
        assert ok.float().mean() > 0.9
        assert rel.median() < 1e-4 and (rel < 0.02).float().mean() > 0.9


def test_synthetic_is_deterministic_and_splits_are_disjoint():
    a, b = render_sample(3, 2, (28, 28)), render_sample(3, 2, (28, 28))
    for key in ("images", "depths", "world_points", "extrinsics", "intrinsics"):
        assert torch.equal(a[key], b[key])
    assert not torch.equal(a["images"], render_sample(4, 2, (28, 28))["images"])
    datasets = [SyntheticMultiViewDataset(4, 2, (28, 28), seed=0, split_id=s) for s in range(4)]
    seeds = [ds.scene_seed(i) for ds in datasets for i in range(4)]
    assert len(set(seeds)) == len(seeds)


def test_synthetic_renders_fast():
    import time

    start = time.perf_counter()
    render_sample(0, 8, (112, 112))
    assert time.perf_counter() - start < 1.5


# ------------------------------------------------------------------ datamodule
def test_datamodule_synthetic_batches():
    dm = MultiViewDataModule(
        num_views=3,
        image_size=(42, 56),
        train_scenes=4,
        val_scenes=2,
        test_scenes=2,
        calibration_scenes=2,
        batch_size=2,
    )
    dm.setup("fit")
    batch = next(iter(dm.train_dataloader()))
    b, s, h, w = 2, 3, 42, 56
    assert batch["images"].shape == (b, s, 3, h, w) and batch["images"].dtype == torch.float32
    assert batch["depths"].shape == (b, s, h, w) and batch["masks"].dtype == torch.bool
    assert batch["world_points"].shape == (b, s, h, w, 3)
    assert batch["extrinsics"].shape == (b, s, 3, 4) and batch["intrinsics"].shape == (b, s, 3, 3)
    assert len(batch["scene"]) == b
    calib = list(dm.calibration_dataloader())
    assert len(calib) == 1 and calib[0]["images"].shape == (b, s, 3, h, w)
    val = next(iter(dm.val_dataloader()))
    train_ids = {sc for bt in dm.train_dataloader() for sc in bt["scene"]}
    assert not train_ids & set(val["scene"]) and not train_ids & set(calib[0]["scene"])
    with pytest.raises(ValueError, match="root"):
        MultiViewDataModule(source="dtu")


def test_datamodule_reads_a_dtu_folder(tmp_path):
    write_dtu(tmp_path)
    dm = MultiViewDataModule(
        source="dtu",
        root=str(tmp_path),
        num_views=2,
        image_size=(28, 42),
        train_scenes=1,
        val_scenes=0,
        test_scenes=1,
        calibration_scenes=1,
    )
    test_batch = next(iter(dm.test_dataloader()))
    assert test_batch["images"].shape == (1, 2, 3, 28, 42)
    calib_scene = next(iter(dm.calibration_dataloader()))["scene"]
    assert calib_scene != test_batch["scene"]


# ------------------------------------------------------------------ loaders
def _assert_matches_truth(sample: dict, truth: dict, depth_rtol: float, cols: slice = slice(None), images=None):
    torch.testing.assert_close(sample["extrinsics"], truth["extrinsics"].float(), atol=1e-5, rtol=0)
    mask = truth["masks"][..., cols]
    assert torch.equal(sample["masks"], mask)
    d_ref = truth["depths"][..., cols][mask]
    assert ((sample["depths"][mask] - d_ref).abs() / d_ref).max() < depth_rtol
    wp_err = (sample["world_points"] - truth["world_points"][..., cols, :]).norm(dim=-1)[mask]
    assert (wp_err / d_ref).max() < 2 * depth_rtol + 1e-5
    assert _backprojection_error(sample).max() < 1e-4
    images = truth["images"] if images is None else images
    assert (sample["images"] - images[..., cols]).abs().mean() < 0.03  # JPEG / resampling


def test_co3d_loader_converts_pytorch3d_ndc_cameras(tmp_path):
    truths = write_co3d(tmp_path)
    ds = CO3DDataset(tmp_path, num_views=3, image_size=(84, 112))
    assert ds.scene_ids == ["toy/seq_a", "toy/seq_b"]
    sample, truth = ds[0], truths["toy/seq_a"]
    torch.testing.assert_close(sample["intrinsics"], truth["intrinsics"].float(), atol=1e-4, rtol=0)
    _assert_matches_truth(sample, truth, depth_rtol=1e-3)
    cropped = CO3DDataset(tmp_path, num_views=3, image_size=(84, 84))[0]  # 14 px cropped on each side
    k = truth["intrinsics"].float().clone()
    k[:, 0, 2] -= 14
    torch.testing.assert_close(cropped["intrinsics"], k, atol=1e-4, rtol=0)
    _assert_matches_truth(cropped, truth, depth_rtol=1e-3, cols=slice(14, 98))


def test_co3d_conversion_agrees_with_a_pytorch3d_style_projection(tmp_path):
    """Project with PyTorch3D's own rules (row vectors, NDC, +x left), compare pixel indices."""
    import gzip
    import json

    write_co3d(tmp_path, frames=2)
    ann = json.load(gzip.open(tmp_path / "toy" / "frame_annotations.jgz", "rt"))[0]
    vp, (height, width) = ann["viewpoint"], ann["image"]["size"]
    sample = CO3DDataset(tmp_path, num_views=2, image_size=(84, 112))[0]
    pts = sample["world_points"][0][sample["masks"][0]][:50].double()
    cam = pts @ torch.tensor(vp["R"], dtype=torch.float64) + torch.tensor(vp["T"], dtype=torch.float64)
    s = min(height, width) / 2
    x_ndc = vp["focal_length"][0] * cam[:, 0] / cam[:, 2] + vp["principal_point"][0]
    y_ndc = vp["focal_length"][1] * cam[:, 1] / cam[:, 2] + vp["principal_point"][1]
    # PyTorch3D pixel-centre i (from the left) sits at x_ndc = (W - 2 i - 1) / (2 s)
    u_p3d, v_p3d = (width - 1) / 2 - x_ndc * s, (height - 1) / 2 - y_ndc * s
    uv, _ = project_points(pts, sample["intrinsics"][0].double(), sample["extrinsics"][0].double())
    torch.testing.assert_close(uv, torch.stack([u_p3d, v_p3d], -1), atol=1e-3, rtol=0)


def test_eth3d_loader_reads_colmap_text_and_raw_depth(tmp_path):
    truth = write_eth3d(tmp_path)
    ds = ETH3DDataset(tmp_path, num_views=3, image_size=(84, 126))
    assert ds.scene_ids == ["courtyard"]
    sample = ds[0]
    torch.testing.assert_close(sample["intrinsics"], truth["intrinsics"].float(), atol=1e-4, rtol=0)
    _assert_matches_truth(sample, truth, depth_rtol=1e-6)
    half = ETH3DDataset(tmp_path, num_views=3, image_size=(42, 56))[0]  # resize 0.5 + crop
    assert half["depths"].shape == (3, 42, 56) and half["masks"].any()
    assert _backprojection_error(half).max() < 1e-4


def test_dtu_loader_reads_mvsnet_cams_and_pfm(tmp_path):
    truths = write_dtu(tmp_path)
    ds = DTUDataset(tmp_path, num_views=3, image_size=(28, 42))
    assert ds.scene_ids == ["scan1", "scan4"]
    sample, truth = ds[1], truths["scan4"]
    assert read_pfm(tmp_path / "Depths" / "scan4_train" / "depth_map_0001.pfm").shape == (28, 42)
    torch.testing.assert_close(sample["intrinsics"], truth["intrinsics"].float(), atol=1e-4, rtol=0)
    _assert_matches_truth(
        sample, truth, depth_rtol=1e-6, images=torch.nn.functional.avg_pool2d(truth["images_high"], 4)
    )  # same 4x4 footprint
    up = DTUDataset(tmp_path, num_views=2, image_size=(56, 84))[0]  # depth upsampled x2 (nearest)
    k_up = upscale_intrinsics(truths["scan1"]["intrinsics"][[0, 2]], 2).float()
    torch.testing.assert_close(up["intrinsics"], k_up, atol=1e-4, rtol=0)
    assert (up["images"] - truths["scan1"]["images_high"][[0, 2], :, ::2, ::2]).abs().mean() < 0.05


def test_loaders_name_missing_files(tmp_path):
    write_eth3d(tmp_path)
    (tmp_path / "courtyard" / "ground_truth_depth" / "dslr_images_undistorted" / "DSC_0002.JPG").unlink()
    with pytest.raises(FileNotFoundError, match="DSC_0002.JPG"):
        ETH3DDataset(tmp_path, num_views=3, image_size=(84, 126))[0]
    with pytest.raises(FileNotFoundError, match="frame_annotations"):
        CO3DDataset(tmp_path / "nothing", num_views=2)
    with pytest.raises(ValueError, match="num_views"):
        ETH3DDataset(tmp_path, num_views=10, image_size=(84, 126))
    assert math.isfinite(float(ETH3DDataset(tmp_path, num_views=2, image_size=(84, 126))[0]["depths"].sum()))
