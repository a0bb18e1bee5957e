"""VGGT components: 2-D RoPE, pose encoding, preprocessing, timm DINOv2 conversion."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.vggt import (
    extri_intri_to_pose_encoding,
    matrix_to_quaternion,
    pose_encoding_to_extri_intri,
    preprocess_images,
    quaternion_to_matrix,
    timm_dinov2_to_patch_embed,
)
from models.vggt.layers import apply_rope, grid_positions, rope_tables
from models.vggt.patch_embed import DinoV2PatchEmbed

# ---------------------------------------------------------------------------------------- RoPE


def _rope(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    return apply_rope(x, rope_tables(pos, x.shape[-1], base=100.0, dtype=torch.float64))


def test_rope_preserves_norm_and_is_identity_at_origin() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 3, 7, 64, generator=g, dtype=torch.float64)
    pos = torch.randint(0, 40, (7, 2), generator=g)
    torch.testing.assert_close(_rope(x, pos).norm(dim=-1), x.norm(dim=-1), rtol=1e-12, atol=1e-12)
    assert torch.equal(_rope(x, torch.zeros(7, 2, dtype=torch.long)), x)
    assert not torch.allclose(_rope(x, pos), x)


def test_rope_dot_product_depends_only_on_offset() -> None:
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 64, generator=g, dtype=torch.float64).unbind(0)
    offset = torch.tensor([3, -5])
    dots = []
    for base in ([0, 5], [7, 9], [20, 11]):
        p = torch.tensor([base, (torch.tensor(base) + offset).tolist()])
        rq = _rope(q.expand(2, 64), p)[0]
        rk = _rope(k.expand(2, 64), p)[1]
        dots.append(float(rq @ rk))
    # angles are formed in float32 like the checkpoint's RoPE, hence ~1e-7 relative agreement
    assert dots[0] == pytest.approx(dots[1], rel=1e-5) and dots[0] == pytest.approx(dots[2], rel=1e-5)
    other = float(_rope(q.expand(2, 64), torch.tensor([[0, 5], [4, 0]]))[0] @ _rope(k.expand(2, 64), p)[1])
    assert abs(other - dots[0]) > 1e-3
    # rows rotate the first half, columns the second half
    p_row, p_col = torch.tensor([[4, 0]]), torch.tensor([[0, 4]])
    x = torch.randn(1, 64, generator=g, dtype=torch.float64)
    assert torch.equal(_rope(x, p_row)[:, 32:], x[:, 32:]) and torch.equal(_rope(x, p_col)[:, :32], x[:, :32])


def test_grid_positions_layout() -> None:
    pos = grid_positions(2, 3, num_special=5)
    assert pos.shape == (11, 2)
    assert pos[:5].abs().sum() == 0
    assert pos[5:].tolist() == [[1, 1], [1, 2], [1, 3], [2, 1], [2, 2], [2, 3]]


# ------------------------------------------------------------------------------- pose encoding


def _random_cameras(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    q = torch.nn.functional.normalize(torch.randn(n, 4, generator=g, dtype=torch.float64), dim=-1)
    R = quaternion_to_matrix(q)
    t = torch.randn(n, 3, 1, generator=g, dtype=torch.float64) * 3
    K = torch.zeros(n, 3, 3, dtype=torch.float64)
    K[:, 0, 0] = 200 + 400 * torch.rand(n, generator=g, dtype=torch.float64)
    K[:, 1, 1] = 200 + 400 * torch.rand(n, generator=g, dtype=torch.float64)
    K[:, 0, 2], K[:, 1, 2], K[:, 2, 2] = 259.0, 175.0, 1.0
    return torch.cat([R, t], dim=-1).reshape(2, n // 2, 3, 4), K.reshape(2, n // 2, 3, 3)


def test_pose_encoding_round_trip() -> None:
    extr, intr = _random_cameras(64, seed=0)
    hw = (350, 518)
    enc = extri_intri_to_pose_encoding(extr, intr, hw)
    assert enc.shape == (2, 32, 9) and enc.dtype == torch.float32
    assert (enc[..., 6] >= 0).all()
    torch.testing.assert_close(enc[..., 3:7].norm(dim=-1), torch.ones(2, 32), rtol=0, atol=1e-6)
    extr2, intr2 = pose_encoding_to_extri_intri(enc.double(), hw)
    torch.testing.assert_close(extr2, extr, rtol=0, atol=1e-5)
    torch.testing.assert_close(intr2, intr, rtol=1e-5, atol=1e-5)  # principal point is the centre here
    enc2 = extri_intri_to_pose_encoding(extr2, intr2, hw)
    torch.testing.assert_close(enc2, enc, rtol=0, atol=1e-5)


def test_quaternion_conversion_is_robust_near_180_degrees() -> None:
    axes = torch.nn.functional.normalize(torch.randn(50, 3, generator=torch.Generator().manual_seed(2)), dim=-1)
    for angle in (0.0, 1e-4, math.pi / 2, math.pi - 1e-6, math.pi):
        q = torch.cat([axes.double() * math.sin(angle / 2), torch.full((50, 1), math.cos(angle / 2))], dim=-1)
        q_back = matrix_to_quaternion(quaternion_to_matrix(q))
        # q and -q are the same rotation
        err = torch.minimum((q_back - q).norm(dim=-1), (q_back + q).norm(dim=-1))
        assert err.max() < 1e-6, angle
    identity = matrix_to_quaternion(torch.eye(3))
    assert identity.tolist() == [0.0, 0.0, 0.0, 1.0]
    with pytest.raises(ValueError, match=r"\[\.\.\., 3, 3\]"):
        matrix_to_quaternion(torch.eye(4))
    with pytest.raises(ValueError, match="image_hw"):
        pose_encoding_to_extri_intri(torch.zeros(1, 1, 9))


# ------------------------------------------------------------------------------- preprocessing


def test_preprocess_crop_and_pad_shapes() -> None:
    wide = torch.randint(0, 256, (3, 300, 640), dtype=torch.uint8)
    tall = torch.rand(3, 640, 300)
    out = preprocess_images([wide], mode="crop")
    assert out.shape == (1, 3, 14 * round(300 * 518 / 640 / 14), 518) == (1, 3, 238, 518)
    assert out.dtype == torch.float32 and 0 <= out.min() and out.max() <= 1
    assert preprocess_images([tall], mode="crop").shape == (1, 3, 518, 518)  # 1106 tall, centre-cropped
    padded = preprocess_images([wide, tall], mode="pad")
    assert padded.shape == (2, 3, 518, 518)
    assert torch.all(padded[0, :, :100] == 1.0)  # white bars above the wide image
    mixed = preprocess_images([wide, tall], mode="crop")
    assert mixed.shape == (2, 3, 518, 518) and torch.all(mixed[0, :, :100] == 1.0)
    assert preprocess_images(torch.rand(2, 3, 28, 42), target_size=42).shape == (2, 3, 28, 42)


def test_preprocess_pil_rgba_and_grayscale() -> None:
    from PIL import Image

    rgba = np.zeros((100, 200, 4), dtype=np.uint8)
    rgba[..., 3] = 0  # fully transparent -> white
    gray = Image.fromarray(np.full((100, 200), 128, dtype=np.uint8), mode="L")
    out = preprocess_images([Image.fromarray(rgba, mode="RGBA"), gray], target_size=140)
    assert out.shape == (2, 3, 70, 140)
    torch.testing.assert_close(out[0], torch.ones(3, 70, 140))
    torch.testing.assert_close(out[1], torch.full((3, 70, 140), 128 / 255), rtol=0, atol=1e-3)


def _official_reference(image, mode: str, target: int = 518):
    """The official ``load_and_preprocess_images`` steps for one 8-bit PIL image, written out with PIL."""
    from PIL import Image

    if image.mode == "RGBA":
        image = Image.alpha_composite(Image.new("RGBA", image.size, (255, 255, 255, 255)), image)
    image = image.convert("RGB")
    width, height = image.size
    if mode == "pad" and height > width:
        new_h, new_w = target, round(width * (target / height) / 14) * 14
    else:
        new_h, new_w = round(height * (target / width) / 14) * 14, target
    out = torch.from_numpy(np.array(image.resize((new_w, new_h), Image.Resampling.BICUBIC))).permute(2, 0, 1) / 255.0
    if mode == "crop" and new_h > target:
        out = out[:, (new_h - target) // 2: (new_h - target) // 2 + target]
    if mode == "pad":
        dh, dw = target - out.shape[1], target - out.shape[2]
        out = torch.nn.functional.pad(out, (dw // 2, dw - dw // 2, dh // 2, dh - dh // 2), value=1.0)
    return out


@pytest.mark.parametrize(("hw", "mode", "target"), [((300, 451), "crop", 518), ((451, 300), "crop", 224),
                                                    ((451, 300), "pad", 518), ((97, 140), "crop", 518)])
def test_preprocess_matches_official_pil_pixels(hw, mode, target) -> None:
    from PIL import Image

    g = np.random.default_rng(0)
    noisy = g.integers(0, 256, (*hw, 3), dtype=np.uint8)  # noise: the worst case for resampling differences
    ref = _official_reference(Image.fromarray(noisy), mode, target)
    for image in (Image.fromarray(noisy), torch.from_numpy(noisy).permute(2, 0, 1), noisy,
                  torch.from_numpy(noisy).permute(2, 0, 1) / 255.0):
        out = preprocess_images([image], mode=mode, target_size=target)[0]
        assert torch.equal(out, ref), type(image)
    # a single float antialiased pass is not the official resize (the gap this module closes)
    new_hw = ref.shape[1:] if mode == "crop" and ref.shape[1] < target else None
    if new_hw is not None:
        one_pass = torch.nn.functional.interpolate(torch.from_numpy(noisy).permute(2, 0, 1)[None].float() / 255,
                                                   size=tuple(new_hw), mode="bicubic", antialias=True)[0].clamp(0, 1)
        assert (one_pass - ref).abs().max() > 5 / 255


def test_preprocess_rgba_composites_like_official() -> None:
    from PIL import Image

    g = np.random.default_rng(1)
    rgba = g.integers(0, 256, (120, 90, 4), dtype=np.uint8)
    ref = _official_reference(Image.fromarray(rgba, mode="RGBA"), "pad", 140)
    assert torch.equal(preprocess_images([Image.fromarray(rgba, mode="RGBA")], mode="pad", target_size=140)[0], ref)
    assert torch.equal(preprocess_images([torch.from_numpy(rgba).permute(2, 0, 1)], mode="pad", target_size=140)[0],
                       ref)


def test_preprocess_errors() -> None:
    img = torch.rand(3, 50, 60)
    with pytest.raises(ValueError, match="mode"):
        preprocess_images([img], mode="stretch")
    with pytest.raises(ValueError, match="non-empty"):
        preprocess_images([])
    with pytest.raises(ValueError, match="multiple of patch_size"):
        preprocess_images([img], target_size=500)
    with pytest.raises(ValueError, match="channels"):
        preprocess_images([torch.rand(2, 50, 60)])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        preprocess_images([img * 255])
    with pytest.raises(TypeError, match="unsupported image type"):
        preprocess_images(["photo.jpg"])


# ------------------------------------------------------------------------ timm DINOv2 backbone


@pytest.mark.parametrize("hw", [(28, 28), (28, 42), (42, 56)])
def test_timm_dinov2_conversion_matches_outputs(hw: tuple[int, int]) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    ref = timm.create_model(
        "vit_large_patch14_reg4_dinov2",
        pretrained=False,
        img_size=28,
        embed_dim=64,
        depth=2,
        num_heads=4,
        num_classes=0,
        dynamic_img_size=True,
        init_values=0.5,
    ).eval()
    with torch.no_grad():  # random, non-trivial tokens and pos_embed
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ours = DinoV2PatchEmbed(img_size=28, patch_size=14, embed_dim=64, depth=2, num_heads=4).eval()
    ours.load_state_dict(timm_dinov2_to_patch_embed(ref.state_dict()), strict=True)
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        expected = ref.forward_features(x)[:, 1 + 4 :]
        got = ours(x)
    assert got.shape == (2, (hw[0] // 14) * (hw[1] // 14), 64)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

    prefixed = timm_dinov2_to_patch_embed(ref.state_dict(), prefix="aggregator.patch_embed.")
    assert all(k.startswith("aggregator.patch_embed.") for k in prefixed)
    with pytest.raises(KeyError, match="unknown timm DINOv2 key"):
        timm_dinov2_to_patch_embed({**ref.state_dict(), "blocks_extra.weight": torch.zeros(1)})
