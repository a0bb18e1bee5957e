"""Camera geometry in the OpenCV convention shared by the data and the model.

Conventions (used everywhere in :mod:`data.multiview` and :mod:`metrics`):

* Camera frame: +x right, +y down, +z forward (OpenCV).
* Extrinsics ``E = [R | t]`` of shape ``[..., 3, 4]`` map world to camera:
  ``X_cam = R X_world + t``.  The camera centre is ``C = -R^T t``.
* Intrinsics ``K`` of shape ``[..., 3, 3]`` in pixels, zero skew:
  ``u = fx X/Z + cx``, ``v = fy Y/Z + cy``, where the *centre* of the top-left pixel
  is ``(0, 0)`` (integer pixel coordinates are pixel centres).
* Depth is z-depth along the optical axis (not the ray length), so back-projection is
  ``X_cam = d * K^{-1} [u, v, 1]^T`` and ``X_world = R^T (X_cam - t)``.

Quaternions are ``(w, x, y, z)`` (COLMAP order), unit norm.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def invert_extrinsics(extrinsics: Tensor) -> Tensor:
    """Invert ``[R|t]``: camera-from-world ``[..., 3, 4]`` -> world-from-camera ``[..., 3, 4]``."""
    rot = extrinsics[..., :3, :3]
    trans = extrinsics[..., :3, 3:]
    rot_t = rot.transpose(-1, -2)
    return torch.cat([rot_t, -rot_t @ trans], dim=-1)


def compose_extrinsics(a: Tensor, b: Tensor) -> Tensor:
    """Compose rigid maps ``a ∘ b`` (apply ``b`` first), both ``[..., 3, 4]``."""
    rot = a[..., :3, :3] @ b[..., :3, :3]
    trans = a[..., :3, :3] @ b[..., :3, 3:] + a[..., :3, 3:]
    return torch.cat([rot, trans], dim=-1)


def camera_centers(extrinsics: Tensor) -> Tensor:
    """Camera centres in world coordinates, ``C = -R^T t``: ``[..., 3, 4]`` -> ``[..., 3]``."""
    rot = extrinsics[..., :3, :3]
    return -(rot.transpose(-1, -2) @ extrinsics[..., :3, 3:]).squeeze(-1)


def pixel_grid(height: int, width: int, device=None, dtype=torch.float32) -> tuple[Tensor, Tensor]:
    """Integer pixel-centre coordinates ``(u, v)``, each ``[H, W]``."""
    v, u = torch.meshgrid(
        torch.arange(height, device=device, dtype=dtype),
        torch.arange(width, device=device, dtype=dtype),
        indexing="ij",
    )
    return u, v


def backproject_depth(depth: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> Tensor:
    """Lift z-depth maps to world points.

    Args:
        depth: ``[..., H, W]`` z-depth.
        intrinsics: ``[..., 3, 3]`` pixel intrinsics (zero skew).
        extrinsics: ``[..., 3, 4]`` camera-from-world.

    Returns:
        ``[..., H, W, 3]`` world points ``R^T (d K^{-1}[u,v,1] - t)``.
    """
    height, width = depth.shape[-2:]
    u, v = pixel_grid(height, width, depth.device, depth.dtype)
    k = intrinsics[..., None, None, :, :]
    x = (u - k[..., 0, 2]) / k[..., 0, 0] * depth
    y = (v - k[..., 1, 2]) / k[..., 1, 1] * depth
    cam = torch.stack([x, y, depth], dim=-1)
    rot = extrinsics[..., None, None, :3, :3]
    trans = extrinsics[..., None, None, :3, 3]
    return ((cam - trans).unsqueeze(-2) @ rot).squeeze(-2)


def world_to_camera(points: Tensor, extrinsics: Tensor) -> Tensor:
    """``[..., N, 3]`` world points -> ``[..., N, 3]`` camera points (``R X + t``)."""
    rot = extrinsics[..., :3, :3]
    return points @ rot.transpose(-1, -2) + extrinsics[..., None, :3, 3]


def project_points(points: Tensor, intrinsics: Tensor, extrinsics: Tensor) -> tuple[Tensor, Tensor]:
    """Project world points into a camera.

    Args:
        points: ``[..., N, 3]`` world points.
        intrinsics: ``[..., 3, 3]``; extrinsics: ``[..., 3, 4]``.

    Returns:
        ``uv [..., N, 2]`` pixel coordinates and ``z [..., N]`` camera z-depth
        (``uv`` is meaningless where ``z <= 0``).
    """
    cam = world_to_camera(points, extrinsics)
    z = cam[..., 2]
    safe_z = torch.where(z.abs() > 1e-12, z, torch.full_like(z, 1e-12))
    u = intrinsics[..., None, 0, 0] * cam[..., 0] / safe_z + intrinsics[..., None, 0, 2]
    v = intrinsics[..., None, 1, 1] * cam[..., 1] / safe_z + intrinsics[..., None, 1, 2]
    return torch.stack([u, v], dim=-1), z


def look_at(eye: Tensor, target: Tensor, up: Tensor | None = None, roll: float = 0.0) -> Tensor:
    """OpenCV camera-from-world extrinsics ``[3, 4]`` of a camera at ``eye`` looking at ``target``.

    The camera's +y (image down) is the negative of ``up`` projected on the image plane,
    then the camera is rolled by ``roll`` radians about its optical axis.
    """
    up = torch.tensor([0.0, 0.0, 1.0], dtype=eye.dtype) if up is None else up
    z = target - eye
    z = z / z.norm()
    y = -(up - (up @ z) * z)
    if y.norm() < 1e-8:
        raise ValueError("look_at: viewing direction is parallel to `up`; choose another up vector.")
    y = y / y.norm()
    x = torch.linalg.cross(y, z)
    c, s = math.cos(roll), math.sin(roll)
    x, y = c * x + s * y, -s * x + c * y
    rot = torch.stack([x, y, z], dim=0)
    return torch.cat([rot, (-rot @ eye)[:, None]], dim=1)


def axis_angle_to_matrix(axis: Tensor, angle: float | Tensor) -> Tensor:
    """Rodrigues: rotation ``[3, 3]`` by ``angle`` radians about ``axis`` ``[3]``."""
    axis = axis / axis.norm()
    angle = torch.as_tensor(angle, dtype=axis.dtype)
    kx, ky, kz = axis.unbind()
    zero = torch.zeros((), dtype=axis.dtype)
    skew = torch.stack([zero, -kz, ky, kz, zero, -kx, -ky, kx, zero]).reshape(3, 3)
    eye = torch.eye(3, dtype=axis.dtype)
    return eye + torch.sin(angle) * skew + (1 - torch.cos(angle)) * (skew @ skew)


def quaternion_to_matrix(quat: Tensor) -> Tensor:
    """Unit quaternion ``(w, x, y, z)`` ``[..., 4]`` -> rotation ``[..., 3, 3]``."""
    quat = quat / quat.norm(dim=-1, keepdim=True)
    w, x, y, z = quat.unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - w * z), 2 * (x * z + w * y),
        2 * (x * y + w * z), 1 - 2 * (x * x + z * z), 2 * (y * z - w * x),
        2 * (x * z - w * y), 2 * (y * z + w * x), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


def matrix_to_quaternion(rot: Tensor) -> Tensor:
    """Rotation ``[3, 3]`` -> unit quaternion ``(w, x, y, z)`` with ``w >= 0``.

    Uses the eigenvector of Bar-Itzhack's symmetric 4x4 matrix (robust for any angle).
    """
    r = rot.to(torch.float64)
    m = (
        torch.stack(
            [
                torch.stack([r[0, 0] - r[1, 1] - r[2, 2], r[1, 0] + r[0, 1], r[2, 0] + r[0, 2], r[2, 1] - r[1, 2]]),
                torch.stack([r[1, 0] + r[0, 1], r[1, 1] - r[0, 0] - r[2, 2], r[2, 1] + r[1, 2], r[0, 2] - r[2, 0]]),
                torch.stack([r[2, 0] + r[0, 2], r[2, 1] + r[1, 2], r[2, 2] - r[0, 0] - r[1, 1], r[1, 0] - r[0, 1]]),
                torch.stack([r[2, 1] - r[1, 2], r[0, 2] - r[2, 0], r[1, 0] - r[0, 1], r[0, 0] + r[1, 1] + r[2, 2]]),
            ]
        )
        / 3.0
    )
    _, vecs = torch.linalg.eigh(m)
    x, y, z, w = vecs[:, -1].unbind()
    quat = torch.stack([w, x, y, z])
    quat = quat if w >= 0 else -quat
    return quat.to(rot.dtype)
