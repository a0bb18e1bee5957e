"""Tiny copies of the real geometry sets, written in their real on-disk formats from synthetic scenes.

* a ViSP-images tree (``mbt-depth/Castle-simu`` and ``mbt-depth/castel``): PGM frames, raw ``.bin``
  depth (uint32 h, w header + uint16) rendered from the *depth* camera, tracker ``.xml`` cameras,
  4x4 pose text files;
* scikit-image's motorcycle files (two PNGs, ``motorcycle_disp.npz`` with ``inf`` holes) of a rectified
  pair rendered with the calibration in ``MOTORCYCLE_QUARTER_CALIB`` scaled to the fixture size;
* opencv-doc's graf files: an image, its warp by a known homography and ``H1to3p.xml``.

The writers encode each format by hand (not through the readers), and return the ground truth.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.multiview.synthetic import random_cameras, random_scene, render

STEREO_SCALE = 0.6  # metres per scene unit for the motorcycle: depths ~3 m as in the real pair
WORLD_SCALE = 0.1  # synthetic scenes are ~5 units away; the uint16 depth formats top out at 2 m (Castle-simu)


def _grey_pgm(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    grey = (image.mean(0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    h, w = grey.shape
    path.write_bytes(f"P5\n{w} {h}\n255\n".encode() + grey.tobytes())


def _depth_bin(depth_m: torch.Tensor, scale: float, path: Path) -> None:
    raw = np.round(depth_m.numpy() / scale).clip(0, 65535).astype("<u2")
    h, w = raw.shape
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(int(h).to_bytes(4, "little") + int(w).to_bytes(4, "little") + raw.tobytes())


def _camera_xml(k: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "<?xml version=\"1.0\"?>\n<conf>\n  <face>\n    <near_clipping>0.01</near_clipping>\n  </face>\n"
        f"  <camera>\n    <px>{float(k[0, 0]):.10f}</px>\n    <py>{float(k[1, 1]):.10f}</py>\n"
        f"    <u0>{float(k[0, 2]):.10f}</u0>\n    <v0>{float(k[1, 2]):.10f}</v0>\n  </camera>\n</conf>\n"
    )


def _matrix_txt(m: torch.Tensor, path: Path) -> None:
    path.write_text("\n".join(" ".join(f"{float(v):.12g}" for v in row) + " " for row in m.tolist()) + "\n")


def _homogeneous(e: torch.Tensor) -> torch.Tensor:
    out = torch.eye(4, dtype=torch.float64)
    out[:3] = e.double()
    return out


def _scene(seed: int, views: int, hw: tuple[int, int]):
    g = torch.Generator().manual_seed(seed)
    scene = random_scene(g)
    extrinsics, intrinsics = random_cameras(g, views, hw, arc_deg=60.0)
    return scene, extrinsics, intrinsics


def write_visp(root: Path, hw: tuple[int, int] = (42, 56), frames: int = 6, seed: int = 3) -> dict:
    """Write ``root/mbt-depth/{Castle-simu,castel}``; returns the colour-camera GT of both.

    Castle-simu's depth camera is the colour camera shifted by ViSP's ``depth_M_color`` (t_x = -5 cm);
    castel's depth camera has its own intrinsics and a small rotation + translation (``depth_M_color.txt``).
    """
    out = {}
    scene, ext, k = _scene(seed, frames, hw)
    base = root / "mbt-depth" / "Castle-simu"
    shift = torch.tensor([-0.05 / WORLD_SCALE, 0.0, 0.0], dtype=torch.float64)
    truth = render(scene, ext, k, hw)
    for i in range(frames):
        e_depth = ext[i].clone()
        e_depth[:, 3] += shift
        depth_view = render(scene, e_depth[None], k[i : i + 1], hw)
        _grey_pgm(truth["images"][i], base / "Images" / f"Image_{i + 1:04d}.pgm")
        _depth_bin(depth_view["depths"][0].double() * WORLD_SCALE, 1 / 32768, base / "Depth" / f"Depth_{i + 1:04d}.bin")
        pose = _homogeneous(ext[i])
        pose[:3, 3] *= WORLD_SCALE
        (base / "CameraPose").mkdir(parents=True, exist_ok=True)
        _matrix_txt(pose, base / "CameraPose" / f"Camera_{i + 1:03d}.txt")
    _camera_xml(k[0], base / "Config" / "chateau.xml")
    _camera_xml(k[0], base / "Config" / "chateau_depth.xml")
    out["castle_simu"] = {"depths": truth["depths"].double() * WORLD_SCALE, "masks": truth["masks"],
                          "extrinsics": torch.cat([ext[:, :, :3], ext[:, :, 3:] * WORLD_SCALE], -1), "K": k[0]}

    scene, ext, k = _scene(seed + 1, frames, hw)
    base = root / "mbt-depth" / "castel"
    k_depth = k[0].clone()
    k_depth[0, 0] *= 0.9
    k_depth[1, 1] *= 0.9
    k_depth[0, 2] += 1.0
    angle = torch.tensor(0.02, dtype=torch.float64)
    depth_m_color = torch.eye(4, dtype=torch.float64)
    depth_m_color[:3, :3] = torch.tensor([[torch.cos(angle), 0, torch.sin(angle)], [0, 1, 0],
                                          [-torch.sin(angle), 0, torch.cos(angle)]], dtype=torch.float64)
    depth_m_color[:3, 3] = torch.tensor([-0.025, 0.001, -0.004], dtype=torch.float64)
    truth = render(scene, ext, k, hw)
    for i in range(frames):
        e_depth = _homogeneous(ext[i])
        e_depth[:3, 3] *= WORLD_SCALE
        e_depth = depth_m_color @ e_depth
        e_depth[:3, 3] /= WORLD_SCALE
        depth_view = render(scene, e_depth[None, :3], k_depth[None], hw)
        _grey_pgm(truth["images"][i], base / "castel" / f"image_{i:04d}.pgm")
        _depth_bin(depth_view["depths"][0].double() * WORLD_SCALE, 0.000124986647,
                   base / "castel" / f"depth_image_{i:04d}.bin")
    _camera_xml(k[0], base / "chateau.xml")
    _camera_xml(k_depth, base / "chateau_depth.xml")
    _matrix_txt(depth_m_color, base / "depth_M_color.txt")
    out["castel"] = {"depths": truth["depths"].double() * WORLD_SCALE, "masks": truth["masks"], "K": k[0]}
    return out


def write_motorcycle(folder: Path, seed: int = 5) -> dict:
    """scikit-image's three motorcycle files of a rectified pair rendered on the full 500x741 grid with the
    documented calibration (the reader applies it); the left camera is a synthetic orbit camera."""
    f, cx, cy, doffs, baseline = 994.978, 311.193, 254.877, 31.086, 0.193001
    scene, ext, _ = _scene(seed, 1, (500, 741))
    k_left = torch.tensor([[f, 0, cx], [0, f, cy], [0, 0, 1]], dtype=torch.float64)
    k_right = k_left.clone()
    k_right[0, 2] += doffs
    e_left = ext[0].clone()
    e_right = e_left.clone()
    e_right[0, 3] -= baseline / STEREO_SCALE
    full = (500, 741)
    left = render(scene, e_left[None], k_left[None], full)
    right = render(scene, e_right[None], k_right[None], full)
    depth = left["depths"][0].double() * STEREO_SCALE
    disp = torch.where(left["masks"][0], baseline * f / depth.clamp_min(1e-9) - doffs,
                       torch.full_like(depth, float("inf")))
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in (("left", left["images"][0]), ("right", right["images"][0])):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"motorcycle_{name}.png")
    np.savez(folder / "motorcycle_disp.npz", disp.float().numpy())
    return {"depth": torch.where(left["masks"][0], depth, torch.zeros_like(depth)), "disparity": disp}


def write_graf(folder: Path, hw: tuple[int, int] = (64, 80), seed: int = 7) -> torch.Tensor:
    """graf1.png (a synthetic render), graf3.png (its warp by ``H``) and ``H1to3p.xml``; returns ``H``."""
    scene, ext, k = _scene(seed, 1, hw)
    image = render(scene, ext, k, hw)["images"][0]
    h_true = torch.tensor([[0.9, -0.1, 6.0], [0.08, 1.05, -3.0], [2e-4, -1e-4, 1.0]], dtype=torch.float64)
    # graf3(x) = graf1(H^-1 x): sample graf1 at the pre-images of graf3's pixels
    H, W = hw
    v, u = torch.meshgrid(torch.arange(H, dtype=torch.float64), torch.arange(W, dtype=torch.float64), indexing="ij")
    pix = torch.stack([u.flatten(), v.flatten(), torch.ones(H * W, dtype=torch.float64)])
    pre = torch.linalg.inv(h_true) @ pix
    x, y = pre[0] / pre[2], pre[1] / pre[2]
    grid = torch.stack([x / (W - 1) * 2 - 1, y / (H - 1) * 2 - 1], -1).reshape(1, H, W, 2).float()
    warped = F.grid_sample(image[None], grid, align_corners=True, padding_mode="border")[0]
    folder.mkdir(parents=True, exist_ok=True)
    for name, img in (("graf1", image), ("graf3", warped)):
        arr = (img.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{name}.png")
    rows = "\n".join("  " + " ".join(f"{v:.8e}" for v in row) for row in h_true.tolist())
    (folder / "H1to3p.xml").write_text(
        "<?xml version=\"1.0\"?>\n<opencv_storage>\n<H13 type_id=\"opencv-matrix\">\n  <rows>3</rows>\n"
        f"  <cols>3</cols>\n  <dt>d</dt>\n  <data>\n{rows} </data></H13>\n</opencv_storage>\n"
    )
    return h_true
