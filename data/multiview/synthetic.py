"""Procedural multi-view scenes rendered by analytic ray casting (pure torch, vectorised).

A scene is a room corner (textured ground plane, back wall, optional side walls) holding
textured boxes (yawed, resting on the ground) and spheres.  Textures are procedural in
each surface's 2-D coordinates (world units), so they are consistent across views and
matchable: checkerboards, stripes and value noise, each with a small noise overlay.

Cameras orbit the scene centre (azimuth spread over an arc, random radius, elevation,
roll and look-at jitter) with pinhole intrinsics from a random field of view.

Rendering: for pixel ``(u, v)`` of a camera ``[R|t]``, ``K`` the ray is
``o + τ d`` with ``o = -R^T t`` and ``d = R^T K^{-1} [u, v, 1]^T``.  Because the camera-frame
direction has unit z, the hit parameter ``τ`` *is* the z-depth.  Primitives:

* plane ``n·x = n·c`` bounded by a rectangle: ``τ = n·(c - o) / n·d``;
* sphere ``|x - c| = r``: smallest root of ``|d|² τ² + 2 d·(o-c) τ + |o-c|² - r² = 0``;
* oriented box: slab test in the box frame, ``τ = max_a min(τ_a⁻, τ_a⁺)``.

Shading is Lambertian: ``rgb = albedo · (ambient + (1 - ambient) max(0, n·l))``; rays that
hit nothing see a sky gradient and get ``depth = 0``, ``mask = False``, point ``0``.
Everything is a deterministic function of the seed.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils.data import Dataset

from data.multiview.common import check_image_size, check_num_views, fov_to_focal, seed_for
from data.multiview.geometry import look_at

log = logging.getLogger(__name__)

CHECKER, STRIPES, NOISE = 0, 1, 2
_EPS = 1e-6
_MASK32 = 0xFFFFFFFF


@dataclass
class Scene:
    """Tensors describing one scene; object index order is planes, boxes, spheres.

    Shapes: planes ``centre/normal/u_axis/v_axis [P,3]``, ``plane_half [P,2]``; boxes
    ``box_centre [B,3]``, ``box_rot [B,3,3]`` (world-from-box), ``box_half [B,3]``; spheres
    ``sphere_centre [Q,3]``, ``sphere_radius [Q]``; textures per object ``tex_kind [N]``,
    ``tex_a/tex_b [N,3]``, ``tex_freq [N]``, ``tex_angle [N]``, ``tex_seed [N]``;
    ``light [3]`` unit vector towards the light.
    """

    plane_centre: Tensor
    plane_normal: Tensor
    plane_u: Tensor
    plane_v: Tensor
    plane_half: Tensor
    box_centre: Tensor
    box_rot: Tensor
    box_half: Tensor
    sphere_centre: Tensor
    sphere_radius: Tensor
    tex_kind: Tensor
    tex_a: Tensor
    tex_b: Tensor
    tex_freq: Tensor
    tex_angle: Tensor
    tex_seed: Tensor
    light: Tensor
    ambient: float = 0.35


def _uniform(g: torch.Generator, low: float, high: float, *shape: int) -> Tensor:
    return low + (high - low) * torch.rand(*shape, generator=g, dtype=torch.float64)


def random_scene(g: torch.Generator) -> Scene:
    """Sample a scene (room corner, 2-4 boxes, 1-3 spheres, textures, light) from ``g``."""
    e = torch.eye(3, dtype=torch.float64)
    centres = [torch.zeros(3), torch.tensor([0.0, 5.0, 3.0])]
    normals, us, vs = [e[2], -e[1]], [e[0], e[0]], [e[1], e[2]]
    halves = [torch.tensor([8.0, 8.0]), torch.tensor([8.0, 3.0])]
    for side in (-1.0, 1.0):
        if torch.rand((), generator=g) < 0.5:
            centres.append(torch.tensor([6.5 * side, 0.0, 3.0]))
            normals.append(-side * e[0])
            us.append(e[1])
            vs.append(e[2])
            halves.append(torch.tensor([8.0, 3.0]))
    num_planes = len(centres)
    num_boxes = int(torch.randint(2, 5, (), generator=g))
    num_spheres = int(torch.randint(1, 4, (), generator=g))

    box_half = _uniform(g, 0.25, 0.7, num_boxes, 3)
    box_centre = torch.cat([_uniform(g, -2.0, 2.0, num_boxes, 2), box_half[:, 2:]], dim=1)
    yaw = _uniform(g, 0.0, math.pi, num_boxes)
    c, s, z, o = torch.cos(yaw), torch.sin(yaw), torch.zeros_like(yaw), torch.ones_like(yaw)
    box_rot = torch.stack([c, -s, z, s, c, z, z, z, o], dim=-1).reshape(num_boxes, 3, 3)

    radius = _uniform(g, 0.3, 0.7, num_spheres)
    lift = _uniform(g, 0.0, 0.6, num_spheres)
    sphere_centre = torch.cat([_uniform(g, -2.0, 2.0, num_spheres, 2), (radius + lift)[:, None]], dim=1)

    n = num_planes + num_boxes + num_spheres
    freq = torch.cat([_uniform(g, 0.8, 2.5, num_planes), _uniform(g, 2.0, 6.0, n - num_planes)])
    el, az = _uniform(g, 0.5, 1.2, 1), _uniform(g, 0.0, 2 * math.pi, 1)
    light = torch.cat([torch.cos(el) * torch.cos(az), torch.cos(el) * torch.sin(az), torch.sin(el)])
    return Scene(
        plane_centre=torch.stack(centres).double(),
        plane_normal=torch.stack(normals),
        plane_u=torch.stack(us),
        plane_v=torch.stack(vs),
        plane_half=torch.stack(halves).double(),
        box_centre=box_centre,
        box_rot=box_rot,
        box_half=box_half,
        sphere_centre=sphere_centre,
        sphere_radius=radius,
        tex_kind=torch.randint(0, 3, (n,), generator=g),
        tex_a=_uniform(g, 0.05, 0.95, n, 3),
        tex_b=_uniform(g, 0.05, 0.95, n, 3),
        tex_freq=freq,
        tex_angle=_uniform(g, 0.0, math.pi, n),
        tex_seed=torch.randint(0, 2**31 - 1, (n,), generator=g),
        light=light,
    )


def random_cameras(
    g: torch.Generator, num_views: int, image_size: tuple[int, int], arc_deg: float = 100.0
) -> tuple[Tensor, Tensor]:
    """Orbit cameras looking at the scene centre: ``extrinsics [S,3,4]``, ``intrinsics [S,3,3]``.

    Azimuths spread evenly over ``arc_deg`` on the -y side (facing the back wall) with jitter;
    radius in [4.5, 6], elevation in [15, 40] deg, roll within ±5 deg, look-at jitter.
    """
    height, width = image_size
    fov = math.radians(float(_uniform(g, 50.0, 65.0, 1)))
    extrinsics, intrinsics = [], []
    step = arc_deg / max(num_views - 1, 1)
    for i in range(num_views):
        az = math.radians(-90.0 - arc_deg / 2 + i * step + float(_uniform(g, -0.3, 0.3, 1)) * step)
        el = math.radians(float(_uniform(g, 15.0, 40.0, 1)))
        radius = float(_uniform(g, 4.5, 6.0, 1))
        eye = radius * torch.tensor(
            [math.cos(el) * math.cos(az), math.cos(el) * math.sin(az), math.sin(el)], dtype=torch.float64
        )
        target = torch.tensor([0.0, 0.0, 0.5], dtype=torch.float64) + _uniform(g, -0.4, 0.4, 3)
        roll = math.radians(float(_uniform(g, -5.0, 5.0, 1)))
        extrinsics.append(look_at(eye, target, roll=roll))
        focal = fov_to_focal(fov, width) * float(_uniform(g, 0.97, 1.03, 1))
        k = torch.tensor([[focal, 0.0, (width - 1) / 2], [0.0, focal, (height - 1) / 2], [0.0, 0.0, 1.0]])
        intrinsics.append(k.double())
    return torch.stack(extrinsics), torch.stack(intrinsics)


def _hash01(ix: Tensor, iy: Tensor, seed: Tensor, channel: int) -> Tensor:
    """Integer lattice hash -> uniform [0, 1]; exact integer arithmetic (no overflow)."""
    h = ((ix * 73856093) ^ (iy * 19349663) ^ (seed * 83492791) ^ (channel * 2654435761)) & _MASK32
    h = ((h ^ (h >> 15)) * 0x2C1B3C6D) & _MASK32
    h = ((h ^ (h >> 12)) * 0x297A2D39) & _MASK32
    h = h ^ (h >> 15)
    return (h & 0xFFFF).double() / 65535.0


def _value_noise(uv: Tensor, freq: Tensor, seed: Tensor) -> Tensor:
    """Bilinearly interpolated lattice colours: ``uv [N,2]`` -> ``[N,3]`` in [0, 1]."""
    p = uv * freq[:, None]
    base = torch.floor(p)
    frac = p - base
    frac = frac * frac * (3 - 2 * frac)
    ix, iy = base[:, 0].long(), base[:, 1].long()
    out = []
    for ch in range(3):
        c00, c10 = _hash01(ix, iy, seed, ch), _hash01(ix + 1, iy, seed, ch)
        c01, c11 = _hash01(ix, iy + 1, seed, ch), _hash01(ix + 1, iy + 1, seed, ch)
        top = c00 + (c10 - c00) * frac[:, 0]
        bottom = c01 + (c11 - c01) * frac[:, 0]
        out.append(top + (bottom - top) * frac[:, 1])
    return torch.stack(out, dim=-1)


def _albedo(scene: Scene, obj: Tensor, uv: Tensor) -> Tensor:
    """Procedural albedo ``[N,3]`` for hit object ids ``obj [N]`` at surface coords ``uv [N,2]``."""
    kind, freq, seed = scene.tex_kind[obj], scene.tex_freq[obj], scene.tex_seed[obj]
    a, b, angle = scene.tex_a[obj], scene.tex_b[obj], scene.tex_angle[obj]
    cells = torch.floor(uv * freq[:, None]).long()
    checker = ((cells[:, 0] + cells[:, 1]) % 2).double()
    along = uv[:, 0] * torch.cos(angle) + uv[:, 1] * torch.sin(angle)
    stripes = (torch.floor(2 * along * freq) % 2).double()
    mix = torch.where(kind == CHECKER, checker, stripes)[:, None]
    pattern = a + (b - a) * mix
    pattern = torch.where((kind == NOISE)[:, None], _value_noise(uv, freq, seed), pattern)
    detail = _value_noise(uv, 4 * freq, seed + 1)
    return (0.8 * pattern + 0.2 * detail).clamp(0.0, 1.0)


def intersect(scene: Scene, origins: Tensor, dirs: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """First hit of rays ``origins + τ dirs`` (``[N,3]`` each, float64).

    Returns ``τ [N]`` (inf on miss), object id ``[N]`` (-1 on miss), unit normal ``[N,3]``
    and surface coordinates ``uv [N,2]``.
    """
    inf = torch.tensor(math.inf, dtype=origins.dtype)
    ts, normals, uvs = [], [], []
    # Planes [P, N].
    c, n = scene.plane_centre[:, None], scene.plane_normal[:, None]
    denom = (n * dirs).sum(-1)
    t = (n * (c - origins)).sum(-1) / torch.where(denom.abs() > 1e-12, denom, torch.full_like(denom, 1e-12))
    rel = origins + t[..., None] * dirs - c
    pu, pv = (rel * scene.plane_u[:, None]).sum(-1), (rel * scene.plane_v[:, None]).sum(-1)
    inside = (pu.abs() <= scene.plane_half[:, None, 0]) & (pv.abs() <= scene.plane_half[:, None, 1])
    ts.append(torch.where(inside & (t > _EPS) & (denom.abs() > 1e-12), t, inf))
    normals.append(n.expand(-1, dirs.shape[0], -1))
    uvs.append(torch.stack([pu, pv], dim=-1))
    # Boxes [B, N]: slab test in the box frame.
    rot_t = scene.box_rot.transpose(1, 2)[:, None]
    o_l = (rot_t @ (origins - scene.box_centre[:, None])[..., None]).squeeze(-1)
    d_l = (rot_t @ dirs[None, :, :, None]).squeeze(-1)
    d_safe = torch.where(d_l.abs() > 1e-12, d_l, torch.full_like(d_l, 1e-12))
    half = scene.box_half[:, None]
    t1, t2 = (-half - o_l) / d_safe, (half - o_l) / d_safe
    t_axis = torch.minimum(t1, t2)
    t_near, axis = t_axis.max(dim=-1)
    t_far = torch.maximum(t1, t2).min(dim=-1).values
    ts.append(torch.where((t_near <= t_far) & (t_near > _EPS), t_near, inf))
    face = torch.nn.functional.one_hot(axis, 3).to(dirs.dtype)
    n_local = -face * torch.sign(d_safe)
    normals.append((scene.box_rot[:, None] @ n_local[..., None]).squeeze(-1))
    p_l = o_l + t_near[..., None] * d_l
    idx = torch.stack([(axis + 1) % 3, (axis + 2) % 3], dim=-1)
    uvs.append(torch.gather(p_l, -1, idx) + 10.0 * axis[..., None])
    # Spheres [Q, N].
    oc = origins - scene.sphere_centre[:, None]
    a = (dirs * dirs).sum(-1)
    bb = (dirs * oc).sum(-1)
    cc = (oc * oc).sum(-1) - scene.sphere_radius[:, None] ** 2
    disc = bb * bb - a * cc
    t = (-bb - torch.sqrt(disc.clamp_min(0.0))) / a
    ts.append(torch.where((disc >= 0) & (t > _EPS), t, inf))
    nrm = (origins + t[..., None] * dirs - scene.sphere_centre[:, None]) / scene.sphere_radius[:, None, None]
    normals.append(nrm)
    r = scene.sphere_radius[:, None]
    uvs.append(torch.stack([torch.atan2(nrm[..., 1], nrm[..., 0]) * r, torch.acos(nrm[..., 2].clamp(-1, 1)) * r], -1))

    t_all = torch.cat(ts)
    best_t, obj = t_all.min(dim=0)
    hit = torch.isfinite(best_t)
    ray = torch.arange(dirs.shape[0])
    normal = torch.cat(normals)[obj, ray]
    uv = torch.cat(uvs)[obj, ray]
    return best_t, torch.where(hit, obj, torch.full_like(obj, -1)), normal, uv


def render(scene: Scene, extrinsics: Tensor, intrinsics: Tensor, image_size: tuple[int, int]) -> dict[str, Tensor]:
    """Render views ``[S,3,4]`` / ``[S,3,3]`` at ``(H, W)``.

    Returns float32 ``images [S,3,H,W]``, ``depths [S,H,W]``, ``masks [S,H,W]`` (bool),
    ``world_points [S,H,W,3]``.
    """
    height, width = image_size
    num_views = extrinsics.shape[0]
    e, k = extrinsics.double(), intrinsics.double()
    f64 = torch.float64
    v, u = torch.meshgrid(torch.arange(height, dtype=f64), torch.arange(width, dtype=f64), indexing="ij")
    x = (u[None] - k[:, None, None, 0, 2]) / k[:, None, None, 0, 0]
    y = (v[None] - k[:, None, None, 1, 2]) / k[:, None, None, 1, 1]
    d_cam = torch.stack([x, y, torch.ones_like(x)], dim=-1)  # [S,H,W,3], unit z => τ is z-depth
    rot = e[:, :3, :3]
    dirs = (d_cam.reshape(num_views, -1, 3) @ rot).reshape(-1, 3)
    centres = -(rot.transpose(1, 2) @ e[:, :3, 3:]).squeeze(-1)
    origins = centres[:, None].expand(-1, height * width, -1).reshape(-1, 3)

    t, obj, normal, uv = intersect(scene, origins, dirs)
    hit = obj >= 0
    normal = torch.where(((normal * dirs).sum(-1) > 0)[:, None], -normal, normal)
    shade = scene.ambient + (1 - scene.ambient) * (normal @ scene.light).clamp_min(0.0)
    rgb = _albedo(scene, obj.clamp_min(0), uv) * shade[:, None]
    sky_t = (dirs[:, 2] / dirs.norm(dim=-1)).clamp(-1, 1)[:, None] * 0.5 + 0.5
    sky = torch.tensor([0.85, 0.9, 1.0], dtype=rgb.dtype) * sky_t + torch.tensor([0.6, 0.6, 0.65]) * (1 - sky_t)
    rgb = torch.where(hit[:, None], rgb, sky)
    depth = torch.where(hit, t, torch.zeros_like(t))
    points = torch.where(hit[:, None], origins + depth[:, None] * dirs, torch.zeros_like(dirs))
    shape = (num_views, height, width)
    return {
        "images": rgb.reshape(*shape, 3).permute(0, 3, 1, 2).float().clamp(0, 1).contiguous(),
        "depths": depth.reshape(shape).float(),
        "masks": hit.reshape(shape),
        "world_points": points.reshape(*shape, 3).float(),
    }


def render_sample(seed: int, num_views: int, image_size: tuple[int, int], scene_id: str | None = None) -> dict:
    """One sample (scene + S views) as the loaders' dict, fully determined by ``seed``."""
    image_size = check_image_size(image_size)
    g = torch.Generator().manual_seed(seed)
    scene = random_scene(g)
    extrinsics, intrinsics = random_cameras(g, num_views, image_size)
    out = render(scene, extrinsics, intrinsics, image_size)
    out["extrinsics"] = extrinsics.float()
    out["intrinsics"] = intrinsics.float()
    out["scene"] = scene_id if scene_id is not None else f"synthetic-{seed}"
    return out


class SyntheticMultiViewDataset(Dataset):
    """``num_scenes`` procedural scenes of ``num_views`` views, rendered on the fly.

    Args:
        num_scenes: dataset length.
        num_views: views per sample (S).
        image_size: ``(H, W)``, multiples of 14.
        seed: base seed; scene ``i`` uses ``seed_for(seed, split_id, i)``.
        split_id: distinguishes splits so that their scenes are disjoint.
        min_views: with ``min_views < num_views`` scene ``i`` has ``S_i`` views, ``S_i`` uniform in
            ``[min_views, num_views]`` and drawn from the scene's seed (samples of a batch then differ in S:
            load them one per batch).  ``None`` = always ``num_views``.
    """

    def __init__(
        self,
        num_scenes: int,
        num_views: int = 8,
        image_size: tuple[int, int] = (112, 112),
        seed: int = 0,
        split_id: int = 0,
        min_views: int | None = None,
    ) -> None:
        if num_scenes < 1:
            raise ValueError(f"num_scenes must be >= 1, got {num_scenes}")
        self.num_scenes, self.num_views = num_scenes, check_num_views(num_views)
        self.min_views = self.num_views if min_views is None else check_num_views(min_views)
        if self.min_views > self.num_views:
            raise ValueError(f"min_views={min_views} exceeds num_views={num_views}; use min_views <= num_views")
        self.image_size = check_image_size(image_size)
        self.seed, self.split_id = seed, split_id

    def __len__(self) -> int:
        return self.num_scenes

    def scene_seed(self, index: int) -> int:
        """The seed of scene ``index`` in this split."""
        return seed_for(self.seed, self.split_id, index)

    def views_of(self, index: int) -> int:
        """Number of views of scene ``index`` (``num_views`` unless ``min_views`` is lower)."""
        if self.min_views == self.num_views:
            return self.num_views
        g = torch.Generator().manual_seed(seed_for(self.scene_seed(index), 1))
        return int(torch.randint(self.min_views, self.num_views + 1, (1,), generator=g))

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < self.num_scenes:
            raise IndexError(f"scene index {index} out of range [0, {self.num_scenes})")
        seed = self.scene_seed(index)
        return render_sample(seed, self.views_of(index), self.image_size,
                             scene_id=f"synthetic-{self.split_id}-{index}")
