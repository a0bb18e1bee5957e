"""Write tiny CO3Dv2 / ETH3D / DTU folders into a tmp dir from synthetic scenes.

The writers re-implement each on-disk format independently of the loaders (including
the inverse camera conversions), so a loader test checks the loader against the format,
not against itself.  Each writer returns the ground truth it rendered.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from data.multiview.geometry import matrix_to_quaternion
from data.multiview.synthetic import random_cameras, random_scene, render


def render_truth(seed: int, num_views: int, hw: tuple[int, int]) -> dict:
    """Scene + cameras + renders at ``hw`` (float64 cameras)."""
    g = torch.Generator().manual_seed(seed)
    scene = random_scene(g)
    extrinsics, intrinsics = random_cameras(g, num_views, hw)
    out = render(scene, extrinsics, intrinsics, hw)
    out.update(scene=scene, extrinsics=extrinsics, intrinsics=intrinsics)
    return out


def upscale_intrinsics(k: torch.Tensor, factor: int) -> torch.Tensor:
    """Intrinsics of the same camera on a grid ``factor`` times finer (pixel-centre exact)."""
    k = k.clone()
    k[..., :2, :2] *= factor
    k[..., :2, 2] = factor * (k[..., :2, 2] + 0.5) - 0.5
    return k


def _save_rgb(image: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = (image.permute(1, 2, 0).numpy() * 255).round().clip(0, 255).astype(np.uint8)
    if path.suffix.lower() == ".jpg":
        Image.fromarray(arr).save(path, quality=98, subsampling=0)
    else:
        Image.fromarray(arr).save(path)


def _save_mask(mask: torch.Tensor, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.numpy().astype(np.uint8) * 255).save(path)


# ---------------------------------------------------------------------------- CO3D
def write_co3d(root: Path, hw: tuple[int, int] = (84, 112), frames: int = 3, scale_adjustment: float = 0.5) -> dict:
    """``<root>/toy/frame_annotations.jgz`` with sequences ``seq_a``, ``seq_b``; returns truths by sequence."""
    height, width = hw
    flip = torch.diag(torch.tensor([-1.0, -1.0, 1.0], dtype=torch.float64))
    s = min(height, width) / 2.0
    annotations, truths = [], {}
    for seq_idx, seq in enumerate(("seq_a", "seq_b")):
        truth = render_truth(100 + seq_idx, frames, hw)
        truths[f"toy/{seq}"] = truth
        for f in range(frames):
            rel = f"toy/{seq}"
            image_path = f"{rel}/images/frame{f + 1:06d}.jpg"
            depth_path = f"{rel}/depths/frame{f + 1:06d}.jpg.geometric.png"
            mask_path = f"{rel}/depth_masks/frame{f + 1:06d}.png"
            _save_rgb(truth["images"][f], root / image_path)
            stored = (truth["depths"][f].numpy() / scale_adjustment).astype(np.float16)
            (root / depth_path).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(stored.view(np.uint16)).save(root / depth_path)
            _save_mask(truth["masks"][f], root / mask_path)
            r_cv, t_cv = truth["extrinsics"][f, :, :3], truth["extrinsics"][f, :, 3]
            k = truth["intrinsics"][f]
            viewpoint = {
                "R": (r_cv.T @ flip).tolist(),  # X_p3d = X R + T  with  F R^T = R_cv
                "T": (flip @ t_cv).tolist(),
                "focal_length": [float(k[0, 0]) / s, float(k[1, 1]) / s],
                "principal_point": [(width / 2 - 0.5 - float(k[0, 2])) / s, (height / 2 - 0.5 - float(k[1, 2])) / s],
                "intrinsics_format": "ndc_isotropic",
            }
            annotations.append(
                {
                    "sequence_name": seq,
                    "frame_number": f,
                    "frame_timestamp": f / 30.0,
                    "image": {"path": image_path, "size": [height, width]},
                    "depth": {"path": depth_path, "scale_adjustment": scale_adjustment, "mask_path": mask_path},
                    "mask": {"path": f"{rel}/masks/frame{f + 1:06d}.png", "mass": 1.0},
                    "viewpoint": viewpoint,
                    "meta": {},
                }
            )
    with gzip.open(root / "toy" / "frame_annotations.jgz", "wt") as fh:
        json.dump(annotations, fh)
    return truths


# --------------------------------------------------------------------------- ETH3D
def write_eth3d(root: Path, hw: tuple[int, int] = (84, 126), frames: int = 3, scene_name: str = "courtyard") -> dict:
    """One ETH3D scene (undistorted PINHOLE calibration, JPGs, raw float depth)."""
    height, width = hw
    truth = render_truth(200, frames, hw)
    base = root / scene_name
    calib = base / "dslr_calibration_undistorted"
    calib.mkdir(parents=True, exist_ok=True)
    cam_lines = ["# Camera list with one line of data per camera:", "#   CAMERA_ID, MODEL, WIDTH, HEIGHT, PARAMS[]"]
    img_lines = [
        "# Image list with two lines of data per image:",
        "#   IMAGE_ID, QW, QX, QY, QZ, TX, TY, TZ, CAMERA_ID, NAME",
        "#   POINTS2D[] as (X, Y, POINT3D_ID)",
    ]
    for f in range(frames):
        k = truth["intrinsics"][f]
        # COLMAP puts the top-left pixel centre at (0.5, 0.5).
        cam_lines.append(
            f"{f + 1} PINHOLE {width} {height} {k[0, 0]:.12g} {k[1, 1]:.12g} {k[0, 2] + 0.5:.12g} {k[1, 2] + 0.5:.12g}"
        )
        q = matrix_to_quaternion(truth["extrinsics"][f, :, :3])
        t = truth["extrinsics"][f, :, 3]
        name = f"dslr_images_undistorted/DSC_{f + 1:04d}.JPG"
        img_lines.append(f"{f + 1} " + " ".join(f"{v:.15g}" for v in [*q.tolist(), *t.tolist()]) + f" {f + 1} {name}")
        img_lines.append("" if f % 2 else "12.5 30.25 -1 40.0 41.5 7")  # POINTS2D lines, one empty
        _save_rgb(truth["images"][f], base / "images" / name)
        depth = truth["depths"][f].numpy().astype("<f4")
        depth[~truth["masks"][f].numpy()] = np.inf
        (base / "ground_truth_depth" / name).parent.mkdir(parents=True, exist_ok=True)
        depth.tofile(base / "ground_truth_depth" / name)
    (calib / "cameras.txt").write_text("\n".join(cam_lines) + "\n")
    (calib / "images.txt").write_text("\n".join(img_lines) + "\n")
    (calib / "points3D.txt").write_text("# 3D point list\n")
    return truth


# ----------------------------------------------------------------------------- DTU
def _write_pfm(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    h, w = array.shape
    with open(path, "wb") as fh:
        fh.write(f"Pf\n{w} {h}\n-1.0\n".encode())
        fh.write(np.ascontiguousarray(array[::-1]).astype("<f4").tobytes())


def write_dtu(
    root: Path,
    depth_hw: tuple[int, int] = (28, 42),
    factor: int = 4,
    views: int = 3,
    scans: tuple[str, ...] = ("scan1", "scan4"),
    light: int = 3,
) -> dict:
    """MVSNet-style DTU: shared cameras (intrinsics on the depth grid), images ``factor`` x larger."""
    image_hw = (depth_hw[0] * factor, depth_hw[1] * factor)
    g = torch.Generator().manual_seed(300)
    extrinsics, intrinsics = random_cameras(g, views, depth_hw)
    for v in range(views):
        e4 = torch.eye(4, dtype=torch.float64)
        e4[:3] = extrinsics[v]
        text = "extrinsic\n" + "\n".join(" ".join(f"{x:.15g}" for x in row) for row in e4.tolist())
        text += "\n\nintrinsic\n" + "\n".join(" ".join(f"{x:.15g}" for x in row) for row in intrinsics[v].tolist())
        text += "\n\n2.0 0.05\n"
        path = root / "Cameras" / "train" / f"{v:08d}_cam.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    truths = {}
    for i, scan in enumerate(scans):
        scene = random_scene(torch.Generator().manual_seed(310 + i))
        low = render(scene, extrinsics, intrinsics, depth_hw)
        high = render(scene, extrinsics, upscale_intrinsics(intrinsics, factor), image_hw)
        for v in range(views):
            for lt in (light, (light + 1) % 7):
                _save_rgb(high["images"][v], root / "Rectified" / f"{scan}_train" / f"rect_{v + 1:03d}_{lt}_r5000.png")
            _write_pfm(root / "Depths" / f"{scan}_train" / f"depth_map_{v:04d}.pfm", low["depths"][v].numpy())
            _save_mask(low["masks"][v], root / "Depths" / f"{scan}_train" / f"depth_visual_{v:04d}.png")
        low.update(extrinsics=extrinsics, intrinsics=intrinsics, scene=scene, images_high=high["images"])
        truths[scan] = low
    return truths
