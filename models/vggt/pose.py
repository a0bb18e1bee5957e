"""Pose encoding "absT_quaR_FoV" and rotation-matrix <-> quaternion conversion.

A camera with extrinsics ``[R | t]`` (camera-from-world, OpenCV: x right, y down, z
forward) and pinhole intrinsics ``K`` (focal lengths ``f_x, f_y``, principal point at the
image centre) on an ``H × W`` image is encoded as the 9-vector::

    [t_x, t_y, t_z, q_x, q_y, q_z, q_w, fov_h, fov_w],
    fov_h = 2 atan(H / (2 f_y)),   fov_w = 2 atan(W / (2 f_x))

with ``q`` the unit quaternion of ``R`` (scalar last, sign chosen so ``q_w >= 0``).
Decoding inverts each part: ``f_y = H / (2 tan(fov_h / 2))``, ``c = (W/2, H/2)``.

``matrix_to_quaternion`` picks, per matrix, the best conditioned of the four candidate
formulas (largest of ``1 ± R_00 ± R_11 ± R_22``), so it is accurate near 180° rotations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def quaternion_to_matrix(quat: Tensor) -> Tensor:
    """Unit quaternions ``[..., 4]`` (XYZW; normalised here) -> rotation matrices ``[..., 3, 3]``."""
    if quat.shape[-1] != 4:
        raise ValueError(f"quaternions must have last dim 4 (x, y, z, w), got {tuple(quat.shape)}")
    x, y, z, w = F.normalize(quat, dim=-1).unbind(-1)
    rows = [
        1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w),
        2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w),
        2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y),
    ]  # fmt: skip
    return torch.stack(rows, dim=-1).reshape(*quat.shape[:-1], 3, 3)


def matrix_to_quaternion(matrix: Tensor) -> Tensor:
    """Rotation matrices ``[..., 3, 3]`` -> unit quaternions ``[..., 4]`` (XYZW, ``w >= 0``)."""
    if matrix.shape[-2:] != (3, 3):
        raise ValueError(f"rotation matrices must be [..., 3, 3], got {tuple(matrix.shape)}")
    m = matrix.reshape(-1, 3, 3)
    m00, m01, m02 = m[:, 0, 0], m[:, 0, 1], m[:, 0, 2]
    m10, m11, m12 = m[:, 1, 0], m[:, 1, 1], m[:, 1, 2]
    m20, m21, m22 = m[:, 2, 0], m[:, 2, 1], m[:, 2, 2]
    # 4·(component)² for w, x, y, z; each candidate row is that quaternion times 4·component.
    sq = torch.stack([1 + m00 + m11 + m22, 1 + m00 - m11 - m22, 1 - m00 + m11 - m22, 1 - m00 - m11 + m22], dim=-1)
    root = torch.sqrt(torch.clamp(sq, min=0.0))  # 2·|component|
    cands = torch.stack(
        [
            torch.stack([m21 - m12, m02 - m20, m10 - m01, root[:, 0] ** 2], dim=-1),  # from w
            torch.stack([root[:, 1] ** 2, m10 + m01, m02 + m20, m21 - m12], dim=-1),  # from x
            torch.stack([m10 + m01, root[:, 2] ** 2, m12 + m21, m02 - m20], dim=-1),  # from y
            torch.stack([m20 + m02, m21 + m12, root[:, 3] ** 2, m10 - m01], dim=-1),  # from z
        ],
        dim=1,
    )  # [M, 4 candidates, (x, y, z, w)]
    denom = 2.0 * torch.clamp(root, min=0.1)
    cands = cands / denom[..., None]
    best = sq.argmax(dim=-1)
    quat = cands[torch.arange(m.shape[0], device=m.device), best]
    quat = F.normalize(quat, dim=-1)
    quat = torch.where(quat[:, 3:4] < 0, -quat, quat)
    return quat.reshape(*matrix.shape[:-2], 4)


def extri_intri_to_pose_encoding(extrinsics: Tensor, intrinsics: Tensor, image_hw: tuple[int, int]) -> Tensor:
    """Encode cameras as ``[..., 9]`` "absT_quaR_FoV".

    Args:
        extrinsics: ``[B, S, 3, 4]`` camera-from-world ``[R | t]`` (OpenCV convention).
        intrinsics: ``[B, S, 3, 3]`` pinhole matrices.
        image_hw: ``(H, W)`` of the image the intrinsics refer to.
    """
    if extrinsics.shape[-2:] != (3, 4):
        raise ValueError(f"extrinsics must be [..., 3, 4], got {tuple(extrinsics.shape)}")
    if intrinsics.shape[-2:] != (3, 3):
        raise ValueError(f"intrinsics must be [..., 3, 3], got {tuple(intrinsics.shape)}")
    H, W = image_hw
    t = extrinsics[..., :3, 3]
    quat = matrix_to_quaternion(extrinsics[..., :3, :3])
    fov_h = 2 * torch.atan((H / 2) / intrinsics[..., 1, 1])
    fov_w = 2 * torch.atan((W / 2) / intrinsics[..., 0, 0])
    return torch.cat([t, quat, fov_h[..., None], fov_w[..., None]], dim=-1).float()


def pose_encoding_to_extri_intri(
    pose_encoding: Tensor, image_hw: tuple[int, int] | None = None, build_intrinsics: bool = True
) -> tuple[Tensor, Tensor | None]:
    """Decode ``[..., 9]`` to extrinsics ``[..., 3, 4]`` and intrinsics ``[..., 3, 3]`` (or None).

    The principal point is put at the image centre ``(W/2, H/2)``; ``image_hw`` is required
    when ``build_intrinsics`` is true.
    """
    if pose_encoding.shape[-1] != 9:
        raise ValueError(f"pose encoding must have last dim 9, got {tuple(pose_encoding.shape)}")
    t = pose_encoding[..., :3]
    R = quaternion_to_matrix(pose_encoding[..., 3:7])
    extrinsics = torch.cat([R, t[..., None]], dim=-1)
    if not build_intrinsics:
        return extrinsics, None
    if image_hw is None:
        raise ValueError("image_hw=(H, W) is needed to build intrinsics; pass it or set build_intrinsics=False")
    H, W = image_hw
    fy = (H / 2.0) / torch.tan(pose_encoding[..., 7] / 2.0)
    fx = (W / 2.0) / torch.tan(pose_encoding[..., 8] / 2.0)
    K = torch.zeros(*pose_encoding.shape[:-1], 3, 3, dtype=pose_encoding.dtype, device=pose_encoding.device)
    K[..., 0, 0] = fx
    K[..., 1, 1] = fy
    K[..., 0, 2] = W / 2
    K[..., 1, 2] = H / 2
    K[..., 2, 2] = 1.0
    return extrinsics, K
