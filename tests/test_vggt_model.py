"""VGGT re-implementation: official parameter names/shapes, loading, forward shapes."""

from __future__ import annotations

import math

import pytest
import torch

from models.vggt import VGGT, VGGTConfig, load_official_state_dict

OFFICIAL_PARAMS_WITH_TRACK = 1_256_537_516
OFFICIAL_PARAMS_WITHOUT_TRACK = 1_190_596_120
OFFICIAL_TENSORS = 1_797


# ----------------------------------------------------------------------------------------------
# Independent generator of the official key list, written from the documented structure
# (reference/vggt.md), not from our modules.


def _ln(prefix: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (dim,), f"{prefix}.bias": (dim,)}


def _linear(prefix: str, out_dim: int, in_dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{prefix}.weight": (out_dim, in_dim), f"{prefix}.bias": (out_dim,)}


def _conv(prefix: str, out_c: int, in_c: int, k: int, bias: bool = True, transpose: bool = False) -> dict:
    shape = (in_c, out_c, k, k) if transpose else (out_c, in_c, k, k)
    return {f"{prefix}.weight": shape, **({f"{prefix}.bias": (out_c,)} if bias else {})}


def _vit_block(prefix: str, dim: int, qk_heads: int | None = None) -> dict:
    d = {**_ln(f"{prefix}.norm1", dim), **_linear(f"{prefix}.attn.qkv", 3 * dim, dim)}
    if qk_heads:
        d.update(_ln(f"{prefix}.attn.q_norm", dim // qk_heads))
        d.update(_ln(f"{prefix}.attn.k_norm", dim // qk_heads))
    d.update(_linear(f"{prefix}.attn.proj", dim, dim))
    d[f"{prefix}.ls1.gamma"] = (dim,)
    d.update(_ln(f"{prefix}.norm2", dim))
    d.update(_linear(f"{prefix}.mlp.fc1", 4 * dim, dim))
    d.update(_linear(f"{prefix}.mlp.fc2", dim, 4 * dim))
    d[f"{prefix}.ls2.gamma"] = (dim,)
    return d


def _dpt(prefix: str, dim: int, features: int, out_dim: int | None, oc=(256, 512, 1024, 1024)) -> dict:
    d = _ln(f"{prefix}.norm", dim)
    for k, c in enumerate(oc):
        d.update(_conv(f"{prefix}.projects.{k}", c, dim, 1))
    d.update(_conv(f"{prefix}.resize_layers.0", oc[0], oc[0], 4, transpose=True))
    d.update(_conv(f"{prefix}.resize_layers.1", oc[1], oc[1], 2, transpose=True))
    d.update(_conv(f"{prefix}.resize_layers.3", oc[3], oc[3], 3))
    for k, c in enumerate(oc):
        d.update(_conv(f"{prefix}.scratch.layer{k + 1}_rn", features, c, 3, bias=False))
    for r in range(1, 5):
        base = f"{prefix}.scratch.refinenet{r}"
        d.update(_conv(f"{base}.out_conv", features, features, 1))
        for unit in (["resConfUnit1"] if r != 4 else []) + ["resConfUnit2"]:
            d.update(_conv(f"{base}.{unit}.conv1", features, features, 3))
            d.update(_conv(f"{base}.{unit}.conv2", features, features, 3))
    if out_dim is None:  # feature-only (track head)
        d.update(_conv(f"{prefix}.scratch.output_conv1", features, features, 3))
    else:
        d.update(_conv(f"{prefix}.scratch.output_conv1", features // 2, features, 3))
        d.update(_conv(f"{prefix}.scratch.output_conv2.0", 32, features // 2, 3))
        d.update(_conv(f"{prefix}.scratch.output_conv2.2", out_dim, 32, 1))
    return d


def _mha_block(prefix: str, dim: int, cross: bool) -> dict:
    d = {**_ln(f"{prefix}.norm1", dim)}
    if cross:
        d.update(_ln(f"{prefix}.norm_context", dim))
    d.update(_ln(f"{prefix}.norm2", dim))
    attn = "cross_attn" if cross else "attn"
    d[f"{prefix}.{attn}.in_proj_weight"] = (3 * dim, dim)
    d[f"{prefix}.{attn}.in_proj_bias"] = (3 * dim,)
    d.update(_linear(f"{prefix}.{attn}.out_proj", dim, dim))
    d.update(_linear(f"{prefix}.mlp.fc1", 4 * dim, dim))
    d.update(_linear(f"{prefix}.mlp.fc2", dim, 4 * dim))
    return d


def official_shapes(with_track: bool = True) -> dict[str, tuple[int, ...]]:
    """Expected names and shapes of facebook/VGGT-1B, from the documented structure."""
    C, D = 1024, 2048
    pe = "aggregator.patch_embed"
    d: dict[str, tuple[int, ...]] = {
        "aggregator.camera_token": (1, 2, 1, C),
        "aggregator.register_token": (1, 2, 4, C),
        f"{pe}.cls_token": (1, 1, C),
        f"{pe}.pos_embed": (1, 37 * 37 + 1, C),
        f"{pe}.register_tokens": (1, 4, C),
        f"{pe}.mask_token": (1, C),
        **_conv(f"{pe}.patch_embed.proj", C, 3, 14),
        **_ln(f"{pe}.norm", C),
    }
    for i in range(24):
        d.update(_vit_block(f"{pe}.blocks.{i}", C))
        d.update(_vit_block(f"aggregator.frame_blocks.{i}", C, qk_heads=16))
        d.update(_vit_block(f"aggregator.global_blocks.{i}", C, qk_heads=16))
    for i in range(4):
        d.update(_vit_block(f"camera_head.trunk.{i}", D))
    d.update(_ln("camera_head.token_norm", D))
    d.update(_ln("camera_head.trunk_norm", D))
    d["camera_head.empty_pose_tokens"] = (1, 1, 9)
    d.update(_linear("camera_head.embed_pose", D, 9))
    d.update(_linear("camera_head.poseLN_modulation.1", 3 * D, D))
    d.update(_linear("camera_head.pose_branch.fc1", D // 2, D))
    d.update(_linear("camera_head.pose_branch.fc2", 9, D // 2))
    d.update(_dpt("depth_head", D, 256, 2))
    d.update(_dpt("point_head", D, 256, 4))
    if with_track:
        d.update(_dpt("track_head.feature_extractor", D, 128, None))
        t, hid, lat = "track_head.tracker", 384, 128
        tdim = 3 * lat + 4
        d.update(_linear(f"{t}.corr_mlp.fc1", hid, 7 * 9 * 9))
        d.update(_linear(f"{t}.corr_mlp.fc2", lat, hid))
        d[f"{t}.query_ref_token"] = (1, 2, tdim)
        u = f"{t}.updateformer"
        d.update(_ln(f"{u}.input_norm", tdim))
        d.update(_linear(f"{u}.input_transform", hid, tdim))
        d.update(_ln(f"{u}.output_norm", hid))
        d.update(_linear(f"{u}.flow_head", lat + 2, hid))
        d[f"{u}.virual_tracks"] = (1, 64, 1, hid)
        for i in range(6):
            d.update(_mha_block(f"{u}.time_blocks.{i}", hid, cross=False))
            d.update(_mha_block(f"{u}.space_virtual_blocks.{i}", hid, cross=False))
            d.update(_mha_block(f"{u}.space_point2virtual_blocks.{i}", hid, cross=True))
            d.update(_mha_block(f"{u}.space_virtual2point_blocks.{i}", hid, cross=True))
        d.update(_ln(f"{t}.fmap_norm", lat))
        d.update(_ln(f"{t}.ffeat_norm", lat))
        d.update(_linear(f"{t}.ffeat_updater.0", lat, lat))
        d.update(_linear(f"{t}.vis_predictor.0", 1, lat))
        d.update(_linear(f"{t}.conf_predictor.0", 1, lat))
    return d


@pytest.fixture(scope="module")
def meta_models() -> tuple[VGGT, VGGT]:
    with torch.device("meta"):
        return VGGT(), VGGT(enable_track=False)


def test_generator_matches_documented_totals() -> None:
    full, no_track = official_shapes(True), official_shapes(False)
    assert len(full) == OFFICIAL_TENSORS
    assert sum(math.prod(s) for s in full.values()) == OFFICIAL_PARAMS_WITH_TRACK
    assert sum(math.prod(s) for s in no_track.values()) == OFFICIAL_PARAMS_WITHOUT_TRACK


def test_default_model_has_official_names_and_shapes(meta_models) -> None:
    full, no_track = meta_models
    for model, with_track in ((full, True), (no_track, False)):
        got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        expected = official_shapes(with_track)
        assert sorted(set(got) - set(expected)) == []
        assert sorted(set(expected) - set(got)) == []
        assert {k: s for k, s in got.items() if s != expected[k]} == {}
    assert sum(p.numel() for p in full.parameters()) == OFFICIAL_PARAMS_WITH_TRACK
    assert sum(p.numel() for p in no_track.parameters()) == OFFICIAL_PARAMS_WITHOUT_TRACK
    assert len(full.state_dict()) == OFFICIAL_TENSORS


def test_all_linear_layers_are_plain(meta_models) -> None:
    full, _ = meta_models
    mha_out = {id(m.out_proj) for m in full.modules() if isinstance(m, torch.nn.MultiheadAttention)}
    linears = [(n, m) for n, m in full.named_modules() if isinstance(m, torch.nn.Linear)]
    assert [n for n, m in linears if type(m) is not torch.nn.Linear and id(m) not in mha_out] == []
    wide = [m for n, m in linears if n.startswith("aggregator.") and 1024 in (m.in_features, m.out_features)]
    assert len(wide) == 288  # qkv, proj, fc1, fc2 of the 72 width-1024 blocks
    assert sum(m.weight.numel() + m.bias.numel() for m in wide) == 906_633_216  # ~72 % of the model


def test_official_state_dict_loads_on_meta(meta_models) -> None:
    full, no_track = meta_models
    sd = {k: torch.empty(s, device="meta") for k, s in official_shapes(True).items()}
    assert load_official_state_dict(full, sd, assign=True) == []
    skipped = load_official_state_dict(no_track, sd, assign=True)
    assert len(skipped) == len(official_shapes(True)) - len(official_shapes(False))
    assert all(k.startswith("track_head.") for k in skipped)


# ----------------------------------------------------------------------------------------------
# Tiny config: loading and forward


@pytest.fixture(scope="module")
def tiny() -> VGGT:
    torch.manual_seed(0)
    return VGGT(VGGTConfig.tiny()).eval()


def _images(B: int, S: int, H: int = 28, W: int = 42, seed: int = 1) -> torch.Tensor:
    return torch.rand(B, S, 3, H, W, generator=torch.Generator().manual_seed(seed))


def test_strict_round_trip_is_exact(tiny, tmp_path) -> None:
    path = tmp_path / "tiny.pt"
    torch.save(tiny.state_dict(), path)
    torch.manual_seed(123)
    fresh = VGGT(VGGTConfig.tiny()).eval()
    x, q = _images(1, 2), torch.tensor([[[10.0, 12.0], [30.0, 5.0]]])
    with torch.no_grad():
        assert not torch.equal(fresh(x)["depth"], tiny(x)["depth"])
        load_official_state_dict(fresh, torch.load(path, weights_only=True))
        a, b = tiny(x, query_points=q), fresh(x, query_points=q)
    for key in ("pose_enc", "depth", "depth_conf", "world_points", "world_points_conf", "track", "vis", "conf"):
        assert torch.equal(a[key], b[key]), key


def test_track_disabled_load_skips_only_track_keys(tiny) -> None:
    sd = tiny.state_dict()
    no_track = VGGT(VGGTConfig.tiny(), enable_track=False)
    skipped = load_official_state_dict(no_track, sd)
    assert skipped and all(k.startswith("track_head.") for k in skipped)
    assert torch.equal(no_track.depth_head.norm.weight, tiny.depth_head.norm.weight)

    with pytest.raises(KeyError, match="missing 1 .*depth_head.norm.bias"):
        load_official_state_dict(no_track, {k: v for k, v in sd.items() if k != "depth_head.norm.bias"})
    with pytest.raises(KeyError, match="unexpected 1 .*aggregator.extra"):
        load_official_state_dict(no_track, {**sd, "aggregator.extra": torch.zeros(1)})
    bad = dict(sd)
    bad["camera_head.embed_pose.bias"] = torch.zeros(3)
    with pytest.raises(ValueError, match="camera_head.embed_pose.bias"):
        load_official_state_dict(no_track, bad)


@pytest.mark.parametrize("B,S", [(1, 1), (2, 3)])
def test_output_keys_and_shapes(tiny, B: int, S: int) -> None:
    H, W, N = 28, 42, 5
    q = torch.rand(B, N, 2) * torch.tensor([W - 1.0, H - 1.0])
    with torch.no_grad():
        out = tiny(_images(B, S, H, W), query_points=q)
    assert set(out) == {
        "pose_enc", "pose_enc_list", "depth", "depth_conf", "world_points", "world_points_conf",
        "images", "track", "vis", "conf",
    }  # fmt: skip
    assert out["pose_enc"].shape == (B, S, 9)
    assert len(out["pose_enc_list"]) == 4 and all(p.shape == (B, S, 9) for p in out["pose_enc_list"])
    assert torch.equal(out["pose_enc_list"][-1], out["pose_enc"])
    assert out["depth"].shape == (B, S, H, W, 1) and out["depth_conf"].shape == (B, S, H, W)
    assert out["world_points"].shape == (B, S, H, W, 3) and out["world_points_conf"].shape == (B, S, H, W)
    assert out["track"].shape == (B, S, N, 2) and out["vis"].shape == (B, S, N) and out["conf"].shape == (B, S, N)
    assert out["images"].shape == (B, S, 3, H, W)
    assert (out["depth"] > 0).all() and (out["depth_conf"] > 1).all() and (out["world_points_conf"] > 1).all()
    assert (out["pose_enc"][..., 7:] >= 0).all()
    assert ((out["vis"] > 0) & (out["vis"] < 1)).all()
    # frame 0 of every track is the query point itself
    assert torch.allclose(out["track"][:, 0], q, atol=1e-5)


def test_four_dim_input_chunking_and_no_queries(tiny) -> None:
    x = _images(1, 3)
    with torch.no_grad():
        ref = tiny(x, frames_chunk_size=None)
        out4 = tiny(x[0], frames_chunk_size=1)
    assert "track" not in ref
    for key in ("depth", "depth_conf", "world_points", "world_points_conf"):
        torch.testing.assert_close(out4[key], ref[key], rtol=1e-5, atol=1e-6)
    assert torch.equal(out4["pose_enc"], ref["pose_enc"])


def test_frame_zero_is_reference_and_batch_independent(tiny) -> None:
    x = _images(2, 3)
    with torch.no_grad():
        both = tiny(x)
        single = tiny(x[1:])
        swapped = tiny(x[:, [0, 2, 1]])
    torch.testing.assert_close(single["pose_enc"][0], both["pose_enc"][1], rtol=1e-4, atol=1e-5)
    # permuting non-reference frames permutes the outputs (global attention is order-free)
    torch.testing.assert_close(swapped["pose_enc"][:, 1], both["pose_enc"][:, 2], rtol=1e-4, atol=1e-5)


def test_training_backward_with_checkpointing() -> None:
    torch.manual_seed(0)
    model = VGGT(VGGTConfig.tiny(depth=2, dpt_layers=(0, 1, 1, 1)), enable_track=False).train()
    model.aggregator.gradient_checkpointing = True
    out = model(_images(1, 2))
    loss = out["depth"].mean() + out["world_points"].abs().mean() + out["pose_enc"].pow(2).mean()
    loss.backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
    assert grads["aggregator.frame_blocks.0.attn.qkv.weight"].abs().sum() > 0
    assert grads["aggregator.patch_embed.patch_embed.proj.weight"].abs().sum() > 0
    assert grads["camera_head.embed_pose.weight"].abs().sum() > 0
    assert model.aggregator.patch_embed.mask_token.grad is None


def test_bad_inputs_raise(tiny) -> None:
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        tiny(torch.rand(1, 2, 3, 30, 42))
    with pytest.raises(ValueError, match=r"\[B, S, 3, H, W\]"):
        tiny(torch.rand(1, 2, 4, 28, 42))
    with pytest.raises(ValueError, match="head dim divisible by 4"):
        VGGTConfig.tiny(embed_dim=24, num_heads=4, backbone_num_heads=4, camera_num_heads=4)
