"""Readers of the real geometry sets (ViSP Castle-simu / castel, Middlebury motorcycle, graf) on
fixtures written in the same formats (tests/fixtures_geometry.py), and their errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from data.multiview import assets
from data.multiview.common import ResizeCrop
from data.multiview.pairs import (
    MOTORCYCLE_QUARTER_CALIB,
    GrafPair,
    MotorcyclePair,
    parse_middlebury_calib,
    read_opencv_matrix_xml,
)
from data.multiview.visp import (
    CastelDataset,
    CastleSimuDataset,
    read_camera_xml,
    read_depth_bin,
    read_homogeneous,
    reproject_depth,
    write_depth_bin,
)
from tests.fixtures_geometry import write_graf, write_motorcycle, write_visp


@pytest.fixture(scope="module")
def visp_tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("visp")
    return root, write_visp(root)


def _median_rel(a: torch.Tensor, b: torch.Tensor, mask: torch.Tensor) -> float:
    return float(((a[mask] - b[mask]).abs() / b[mask]).median())


def test_depth_bin_round_trip_and_truncation(tmp_path):
    raw = np.arange(12, dtype=np.uint16).reshape(3, 4) * 1000
    write_depth_bin(tmp_path / "d.bin", raw)
    assert (tmp_path / "d.bin").stat().st_size == 8 + 2 * 12
    np.testing.assert_array_equal(read_depth_bin(tmp_path / "d.bin"), raw)
    (tmp_path / "cut.bin").write_bytes((tmp_path / "d.bin").read_bytes()[:-2])
    with pytest.raises(ValueError, match="header says 3x4"):
        read_depth_bin(tmp_path / "cut.bin")


def test_reproject_depth_identity_and_translation():
    k = torch.tensor([[50.0, 0, 15.5], [0, 50.0, 11.5], [0, 0, 1]], dtype=torch.float64)
    depth = torch.full((24, 32), 2.0, dtype=torch.float64)
    same = reproject_depth(depth, k, k, torch.eye(4, dtype=torch.float64), (24, 32))
    assert torch.equal(same, depth)
    move = torch.eye(4, dtype=torch.float64)
    move[0, 3] = 0.08  # destination sees the plane shifted by f t / Z = 2 px to the right, same depth
    shifted = reproject_depth(depth, k, k, move, (24, 32))
    assert torch.equal(shifted[:, 2:], depth[:, :-2]) and torch.all(shifted[:, :2] == 0)


def test_castle_simu_reader_matches_rendered_truth(visp_tree):
    root, truth = visp_tree
    gt = truth["castle_simu"]
    ds = CastleSimuDataset(root, num_views=3, image_size=(42, 56), stride=2)
    assert len(ds) == 6 - 2 * 2
    torch.testing.assert_close(read_camera_xml(root / "mbt-depth/Castle-simu/Config/chateau.xml"), gt["K"])
    sample = ds[1]
    frames = [1, 3, 5]
    torch.testing.assert_close(sample["extrinsics"].double(), gt["extrinsics"][frames], atol=1e-6, rtol=0)
    torch.testing.assert_close(sample["intrinsics"][0].double(), gt["K"], atol=1e-5, rtol=0)
    both = sample["masks"] & gt["masks"][frames]
    # depth rendered 5 cm to the side, warped back into the grey camera: the uint16 quantum is 30 um
    assert both.float().mean() > 0.5
    assert _median_rel(sample["depths"].double(), gt["depths"][frames], both) < 2e-3
    # without ViSP's depth_M_color shift the same warp is visibly worse
    ds.color_from_depth = torch.eye(4, dtype=torch.float64)
    unshifted = ds[1]
    both2 = unshifted["masks"] & gt["masks"][frames]
    assert _median_rel(unshifted["depths"].double(), gt["depths"][frames], both2) > 3 * _median_rel(
        sample["depths"].double(), gt["depths"][frames], both)
    assert bool(sample["has_poses"])


def test_castel_reader_uses_depth_intrinsics_and_extrinsic(visp_tree):
    root, truth = visp_tree
    gt = truth["castel"]
    m = read_homogeneous(root / "mbt-depth/castel/depth_M_color.txt")
    assert abs(float(m[0, 3]) + 0.025) < 1e-12
    ds = CastelDataset(root, num_views=2, image_size=(42, 56), stride=1)
    assert len(ds) == 5
    sample = ds[0]
    both = sample["masks"] & gt["masks"][:2]
    assert both.float().mean() > 0.4
    assert _median_rel(sample["depths"].double(), gt["depths"][:2], both) < 1e-2
    assert not bool(sample["has_poses"])


def test_motorcycle_reader_depth_and_correspondences(tmp_path):
    truth = write_motorcycle(tmp_path)
    sample = MotorcyclePair(tmp_path, image_size=(112, 168), num_points=64)[0]
    calib = parse_middlebury_calib(MOTORCYCLE_QUARTER_CALIB)
    assert calib["baseline_m"] == pytest.approx(0.193001) and float(calib["K1"][0, 2]) == pytest.approx(342.279)
    rc = ResizeCrop.cover((500, 741), (112, 168))  # the width decides: 168/741, then a 1-row crop
    sx, sy = rc.resized[1] / 741, rc.resized[0] / 500
    d = truth["disparity"]
    q, t = sample["query_points"].double(), sample["target_points"].double()
    assert len(q) > 10 and torch.allclose(q[:, 1], t[:, 1])
    # undo the resize of each query point and read its disparity on the full grid
    fx = (q[:, 0] + rc.left + 0.5) / sx - 0.5
    fy = (q[:, 1] + rc.top + 0.5) / sy - 0.5
    dq = d[fy.round().long(), fx.round().long()]
    torch.testing.assert_close(q[:, 0] - t[:, 0], dq * sx, atol=1e-4, rtol=1e-5)
    # depth of the left view equals B f / (d + doffs) of the rendered scene (nearest-sampled)
    valid = sample["masks"][0]
    assert valid.float().mean() > 0.3 and sample["masks"][1].float().mean() > 0.2
    # the right view's depth, warped from the left, agrees with the left one at the GT matches
    qi, ti = q.round().long(), t.round().long()
    both = sample["masks"][0][qi[:, 1], qi[:, 0]] & sample["masks"][1][ti[:, 1], ti[:, 0]]
    assert both.sum() > 5
    z0 = sample["depths"][0][qi[both, 1], qi[both, 0]]
    z1 = sample["depths"][1][ti[both, 1], ti[both, 0]]
    assert float(((z0 - z1).abs() / z0).median()) < 0.02
    ext = sample["extrinsics"]
    assert float(ext[1, 0, 3]) == pytest.approx(-0.193001) and torch.equal(ext[0], torch.eye(3, 4))
    gt_vals = truth["depth"][truth["depth"] > 0]
    assert float(sample["depths"][0][valid].median()) == pytest.approx(float(gt_vals.median()), rel=0.1)


def test_graf_reader_homography(tmp_path):
    h_true = write_graf(tmp_path)
    torch.testing.assert_close(read_opencv_matrix_xml(tmp_path / "H1to3p.xml"), h_true, atol=1e-8, rtol=1e-7)
    pair = GrafPair(tmp_path, image_size=(56, 70), num_points=49)
    sample = pair[0]
    # 64x80 -> 56x70 is a uniform 0.875 scale with no crop: the resized homography is S H S^-1
    s = torch.diag(torch.tensor([0.875, 0.875, 1.0], dtype=torch.float64))
    s[:2, 2] = 0.5 * 0.875 - 0.5
    expected = s @ h_true @ torch.linalg.inv(s)
    torch.testing.assert_close(sample["homography"].double(), (expected / expected[2, 2]).float().double(),
                               atol=1e-4, rtol=1e-4)
    q, t = sample["query_points"], sample["target_points"]
    assert len(q) > 20
    # the warped image agrees with the original at the GT matches far better than at the same pixel
    img0, img1 = sample["images"]

    def at(img, pts):
        grid = torch.stack([pts[:, 0] / 69 * 2 - 1, pts[:, 1] / 55 * 2 - 1], -1)[None, None]
        return torch.nn.functional.grid_sample(img[None], grid, align_corners=True)[0, :, 0]

    assert (at(img0, q) - at(img1, t)).abs().mean() < 0.5 * (at(img0, q) - at(img1, q)).abs().mean()


def test_missing_data_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_VGGT_ASSETS", str(tmp_path / "none"))
    monkeypatch.delenv("VISP_INPUT_IMAGE_PATH", raising=False)
    monkeypatch.setattr(assets, "VISP_SUBDIR", "no/such/visp")
    monkeypatch.setattr(assets, "OPENCV_SUBDIR", "no/such/opencv")
    with pytest.raises(FileNotFoundError, match="visp-images-data.*python -m data.multiview.assets fetch"):
        CastleSimuDataset()
    with pytest.raises(FileNotFoundError, match="opencv-doc"):
        GrafPair()
    with pytest.raises(FileNotFoundError, match="scikit-image"):
        MotorcyclePair(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="scikit-image"):
        assets.skimage_data_root(tmp_path)
