"""Geometry metrics: camera AUC, depth, Umeyama, point maps, two-view matching AUC."""

from __future__ import annotations

import math

import pytest
import torch

from data.multiview.geometry import axis_angle_to_matrix, compose_extrinsics, invert_extrinsics
from data.multiview.synthetic import render_sample
from metrics.alignment import apply_similarity, umeyama
from metrics.camera import (
    CameraPoseMetric,
    camera_pose_auc,
    pose_auc_from_errors,
    relative_pose_errors,
    translation_angle_deg,
)
from metrics.depth import DepthMetric, depth_errors
from metrics.matching import TwoViewPoseAUC, pose_auc, two_view_pose_errors
from metrics.pointmap import PointMapMetric, nearest_neighbor_distances, pointmap_errors

Z = torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64)


@pytest.fixture(scope="module")
def sample():
    return render_sample(5, 4, (42, 42))


def _in_first_camera_frame(extrinsics: torch.Tensor, scale: float) -> torch.Tensor:
    """What VGGT predicts: cameras relative to the first one, in an arbitrary scale."""
    rel = compose_extrinsics(extrinsics, invert_extrinsics(extrinsics[:1]).expand_as(extrinsics))
    return torch.cat([rel[..., :3], scale * rel[..., 3:]], dim=-1)


# -------------------------------------------------------------------- camera
def test_perfect_cameras_score_100_in_any_world_frame_and_scale(sample):
    gt = sample["extrinsics"].double()
    assert not torch.allclose(gt[0, :, :3], torch.eye(3, dtype=torch.float64))
    pred = _in_first_camera_frame(gt, scale=2.5)
    rot, trans = relative_pose_errors(pred, gt)
    assert rot.shape == (6,) and rot.max() < 1e-5 and trans.max() < 1e-5
    assert camera_pose_auc(pred, gt).item() == pytest.approx(100.0)
    metric = CameraPoseMetric()
    metric.update(pred[None], gt[None])
    out = metric.compute()
    assert out["auc@30"].item() == pytest.approx(100.0)
    assert out["rra@30"].item() == pytest.approx(100.0) and out["rta@30"].item() == pytest.approx(100.0)


def test_rotating_one_camera_gives_exactly_that_rotation_error(sample):
    gt = sample["extrinsics"].double()
    pred = gt.clone()
    k = 2
    rz = axis_angle_to_matrix(Z, math.radians(10.5))  # about its own optical axis: centre unchanged
    pred[k] = rz @ gt[k]
    rot, trans = relative_pose_errors(pred, gt)
    involves = torch.tensor([k in pair for pair in [(0, 1), (0, 2), (0, 3), (1, 2), (1, 3), (2, 3)]])
    torch.testing.assert_close(rot[involves], torch.full((3,), 10.5, dtype=torch.float64))
    assert rot[~involves].max() < 1e-5 and trans.max() <= 10.5 + 1e-6
    # 3 pairs at ~0 deg and 3 at 10.5 deg: recall 1/2 for thresholds 1..10, 1 for 11..30
    assert camera_pose_auc(pred, gt).item() == pytest.approx(100 * (10 * 0.5 + 20 * 1.0) / 30)


def test_translation_angle_and_sign_ambiguity():
    t_gt = torch.tensor([1.0, 0.0, 0.0], dtype=torch.float64)
    t30 = torch.tensor([math.cos(math.radians(30)), math.sin(math.radians(30)), 0.0], dtype=torch.float64)
    assert translation_angle_deg(t30, t_gt).item() == pytest.approx(30.0)
    assert translation_angle_deg(-t30, t_gt).item() == pytest.approx(30.0)
    assert translation_angle_deg(-t30, t_gt, sign_ambiguity=False).item() == pytest.approx(150.0)
    assert translation_angle_deg(torch.zeros(3), torch.zeros(3)).item() == 0.0
    assert translation_angle_deg(torch.zeros(3), t_gt).item() == 90.0


def test_camera_auc_by_hand_and_metric_accumulation(sample):
    # max errors 0.5, 2.5, 40 with T=3: bins [0,1),[1,2),[2,3] -> 1,0,1 -> cumsum/3 = 1/3,1/3,2/3
    auc = pose_auc_from_errors(torch.tensor([0.5, 2.5, 40.0]), torch.tensor([0.2, 0.1, 0.0]), max_threshold=3)
    assert auc.item() == pytest.approx(100 * 4 / 9)
    assert pose_auc_from_errors(torch.tensor([30.0]), torch.tensor([0.0])).item() == pytest.approx(100 / 30)
    gt = sample["extrinsics"].double()
    noisy = gt.clone()
    noisy[1] = axis_angle_to_matrix(torch.tensor([1.0, 2.0, 0.5], dtype=torch.float64), 0.3) @ gt[1]
    metric = CameraPoseMetric(max_threshold=30, accuracy_threshold=15)
    metric.update(gt[None], gt[None])
    metric.update(noisy, gt)
    rot = torch.cat([relative_pose_errors(gt, gt)[0], relative_pose_errors(noisy, gt)[0]])
    trans = torch.cat([relative_pose_errors(gt, gt)[1], relative_pose_errors(noisy, gt)[1]])
    out = metric.compute()
    assert out["auc@30"].item() == pytest.approx(pose_auc_from_errors(rot, trans).item())
    assert out["rra@15"].item() == pytest.approx(100 * (rot < 15).double().mean().item())
    assert out["rot_error_mean"].item() == pytest.approx(rot.mean().item())


# -------------------------------------------------------------------- depth
def test_depth_metric_perfect_scale_invariant_and_known_error(sample):
    gt, mask = sample["depths"], sample["masks"]
    metric = DepthMetric()
    metric.update(gt * 3.7, gt, mask)  # any global scale is undone by the median alignment
    out = metric.compute()
    assert out["abs_rel"].item() == pytest.approx(0.0, abs=1e-6) and out["delta_1.25"].item() == 1.0
    # 10 % too far on every other valid pixel, no alignment: AbsRel = mean(0.1 * half) per image
    pred = gt.clone().double()
    bump = torch.zeros_like(mask)
    bump[..., ::2] = True
    pred[bump] *= 1.1
    abs_rel, delta, ok = depth_errors(pred, gt.double(), mask, align="none")
    expected = torch.stack([(bump[i] & mask[i]).sum() / mask[i].sum() for i in range(4)]).double() * 0.1
    torch.testing.assert_close(abs_rel, expected)
    assert ok.all() and (delta == 1).all()
    # a 1.5x prediction fails delta without alignment, passes with it
    assert depth_errors(gt * 1.5, gt, mask, align="none")[1].max() == 0
    assert depth_errors((gt * 1.5)[..., None], gt, mask)[1].min() == 1


# -------------------------------------------------------------------- alignment
def test_umeyama_recovers_a_known_similarity_exactly():
    g = torch.Generator().manual_seed(0)
    src = torch.randn(50, 3, generator=g, dtype=torch.float64)
    rot = axis_angle_to_matrix(torch.tensor([0.3, -1.0, 0.4], dtype=torch.float64), 2.1)
    dst = 2.5 * src @ rot.T + torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64)
    weights = torch.ones(50, dtype=torch.float64)
    dst[:10] += 5.0 * torch.randn(10, 3, generator=g, dtype=torch.float64)  # outliers, weight 0
    weights[:10] = 0.0
    s, r, t = umeyama(src, dst, weights)
    assert s.item() == pytest.approx(2.5, abs=1e-10)
    torch.testing.assert_close(r, rot, atol=1e-10, rtol=0)
    torch.testing.assert_close(t, torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64), atol=1e-10, rtol=0)
    assert torch.det(r).item() == pytest.approx(1.0)
    s_rigid, _, _ = umeyama(src[10:], dst[10:], with_scale=False)
    assert s_rigid.item() == 1.0
    with pytest.raises(ValueError, match="at least 3"):
        umeyama(src[:2], dst[:2])


# -------------------------------------------------------------------- point maps
def test_pointmap_chamfer_zero_after_similarity_and_known_offset(sample):
    gt, mask = sample["world_points"], sample["masks"]
    rot = axis_angle_to_matrix(torch.tensor([1.0, 1.0, 0.0], dtype=torch.float64), 0.7)
    pred = apply_similarity(gt.double(), torch.tensor(0.3, dtype=torch.float64), rot, torch.tensor([3.0, 0, -1]))
    metric = PointMapMetric(max_points=4000)
    metric.update(pred.float()[None], gt[None], mask[None])
    out = metric.compute()
    assert out["chamfer"].item() < 1e-4 and out["accuracy"].item() < 1e-4 and out["completeness"].item() < 1e-4
    # a unit grid shifted by 0.3 along its normal: every nearest neighbour is 0.3 away
    yy, xx = torch.meshgrid(torch.arange(10.0), torch.arange(12.0), indexing="ij")
    grid = torch.stack([xx, yy, torch.zeros_like(xx)], dim=-1)
    errs = pointmap_errors(grid + torch.tensor([0.0, 0.0, 0.3]), grid, align="none")
    for key in ("accuracy", "completeness", "chamfer", "accuracy_median"):
        assert errs[key].item() == pytest.approx(0.3, abs=1e-6)


def test_nearest_neighbours_chunked_equal_brute_force():
    g = torch.Generator().manual_seed(1)
    q, r = torch.randn(300, 3, generator=g), torch.randn(200, 3, generator=g)
    brute = torch.cdist(q, r).min(dim=1).values
    torch.testing.assert_close(nearest_neighbor_distances(q, r, max_chunk_elements=1000), brute)


# -------------------------------------------------------------------- matching
def test_two_view_auc_by_hand_perfect_and_known_rotation():
    # sorted errors 1, 3, 6; recall 1/3, 2/3, 1. Area up to 5: 1/6 + 1 + 4/3 = 2.5 -> 50 %.
    # Up to 10: 1/6 + 1 + (2/3 + 1)/2 * 3 + 1 * 4 = 7.667 -> 76.67 %.
    aucs = pose_auc(torch.tensor([6.0, 1.0, 3.0]), thresholds=(5, 10))
    assert aucs[0].item() == pytest.approx(50.0) and aucs[1].item() == pytest.approx(100 * 23 / 30)
    gt = torch.cat([torch.eye(3), torch.tensor([[1.0], [0.2], [0.1]])], dim=1).double()[None].repeat(4, 1, 1)
    metric = TwoViewPoseAUC()
    metric.update(gt.clone(), gt)
    assert all(v.item() == pytest.approx(100.0) for v in metric.compute().values())
    pred = gt.clone()
    pred[:, :, :3] = axis_angle_to_matrix(torch.tensor([0.0, 1.0, 1.0], dtype=torch.float64), math.radians(10))
    pred[:, :, 3] = pred[:, :, :3] @ gt[0, :, 3]  # translation rotated too: both errors <= 10
    torch.testing.assert_close(two_view_pose_errors(pred, gt), torch.full((4,), 10.0, dtype=torch.float64))
    pred[0] = math.nan  # a failed estimate counts as infinite error
    assert math.isinf(two_view_pose_errors(pred, gt)[0].item())


def test_metric_states_merge_like_ddp(sample):
    """Two 'ranks' merged with the declared reductions equal one metric that saw everything."""
    gt = sample["extrinsics"].double()
    noisy = gt.clone()
    noisy[3] = axis_angle_to_matrix(Z, math.radians(4.2)) @ gt[3]
    whole, rank0, rank1 = CameraPoseMetric(), CameraPoseMetric(), CameraPoseMetric()
    whole.update(torch.stack([gt, noisy]), torch.stack([gt, gt]))
    rank0.update(gt, gt)
    rank1.update(noisy, gt)
    rank0.merge_state(rank1)
    for key, value in whole.compute().items():
        assert rank0.compute()[key].item() == pytest.approx(value.item())
    pairs = two_view_pose_errors(noisy[1:], gt[1:])
    whole_m, part0, part1 = TwoViewPoseAUC(), TwoViewPoseAUC(), TwoViewPoseAUC()
    whole_m.update(noisy[1:], gt[1:])
    part0.update(noisy[1:2], gt[1:2])
    part1.update(noisy[2:], gt[2:])
    part0.merge_state(part1)
    assert part0.compute()["auc@5"].item() == pytest.approx(pose_auc(pairs, (5,))[0].item())
    assert whole_m.compute()["auc@5"].item() == pytest.approx(part0.compute()["auc@5"].item())
