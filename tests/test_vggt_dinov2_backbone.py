"""A DINOv2 without registers (transformers ``Dinov2Model``, e.g. the real DINOv2-S/14) as VGGT's patch embed."""

from __future__ import annotations

import pytest
import torch
from fixtures_vit import tiny_dinov2

from models.vggt import VGGT, VGGTConfig
from models.vggt.convert import hf_dinov2_to_patch_embed, load_dinov2_patch_embed_

pytestmark = pytest.mark.usefixtures("one_thread")


def tiny_vggt_for(hf) -> VGGT:
    cfg = VGGTConfig.tiny(img_size=56, embed_dim=hf.config.hidden_size, backbone_depth=2,
                          backbone_num_heads=hf.config.num_attention_heads, backbone_register_tokens=0,
                          backbone_interp_antialias=False)
    return VGGT(cfg, enable_track=False).eval()


@pytest.mark.parametrize("hw", [(56, 56), (42, 70)])  # the stored 4x4 grid, and a resized one
def test_no_register_dinov2_patch_embed_matches_transformers(hw) -> None:
    hf = tiny_dinov2(width=128)  # 2 heads: the fused qkv must split into heads as transformers does
    model = tiny_vggt_for(hf)
    assert not hasattr(model.aggregator.patch_embed, "register_tokens")
    assert model.aggregator.patch_start_idx == 5  # the aggregator keeps its own camera + 4 register tokens
    load_dinov2_patch_embed_(model, hf.state_dict())
    x = torch.randn(2, 3, *hw)
    with torch.no_grad():
        ours = model.aggregator.patch_embed(x)
        ref = hf(pixel_values=x).last_hidden_state[:, 1:]
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        out = model(torch.rand(1, 2, 3, *hw))
    assert out["depth"].shape == (1, 2, *hw, 1) and torch.isfinite(out["pose_enc"]).all()


def test_conversion_stacks_qkv_and_accepts_both_namings() -> None:
    hf = tiny_dinov2()
    sd = hf.state_dict()
    out = hf_dinov2_to_patch_embed(sd, prefix="aggregator.patch_embed.")
    qkv = out["aggregator.patch_embed.blocks.1.attn.qkv.weight"]
    a = hf.encoder.layer[1].attention
    assert torch.equal(qkv, torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight]))
    assert torch.equal(out["aggregator.patch_embed.blocks.0.ls2.gamma"], hf.encoder.layer[0].layer_scale2.lambda1)
    old = {k.replace("attention.q_proj.", "attention.attention.query.").replace("attention.k_proj.",
           "attention.attention.key.").replace("attention.v_proj.", "attention.attention.value.")
           .replace("attention.o_proj.", "attention.output.dense."): v for k, v in sd.items()}
    old.pop("embeddings.mask_token")
    converted = hf_dinov2_to_patch_embed(old)
    for k, v in hf_dinov2_to_patch_embed(sd).items():
        assert torch.equal(converted[k], v), k
    with pytest.raises(KeyError, match="unknown"):
        hf_dinov2_to_patch_embed({**sd, "pooler.dense.weight": torch.zeros(1)})


def test_loading_refuses_a_backbone_with_registers_or_other_sizes() -> None:
    hf = tiny_dinov2()
    with_registers = VGGT(VGGTConfig.tiny(img_size=56, embed_dim=64, backbone_num_heads=1), enable_track=False)
    with pytest.raises(ValueError, match="backbone_register_tokens=0"):
        load_dinov2_patch_embed_(with_registers, hf.state_dict())
    deeper = VGGT(VGGTConfig.tiny(img_size=56, embed_dim=64, backbone_depth=3, backbone_num_heads=1,
                                  backbone_register_tokens=0), enable_track=False)
    with pytest.raises(ValueError, match="missing .*blocks.2"):
        load_dinov2_patch_embed_(deeper, hf.state_dict())


def test_vggt_small_config() -> None:
    cfg = VGGTConfig.small()
    assert cfg.backbone_registers == 0 and cfg.patch_start_idx == 5 and cfg.embed_dim == 384
    with torch.device("meta"):
        model = VGGT(cfg, enable_track=False)
    backbone = sum(p.numel() for p in model.aggregator.patch_embed.parameters())
    assert backbone == 22_056_192 + 384  # DINOv2-S/14 (+ the unused mask token)
    with pytest.raises(ValueError, match="backbone_register_tokens"):
        VGGTConfig.small(backbone_register_tokens=-1)


@pytest.mark.slow
def test_vggt_small_with_the_real_dinov2_s_backbone() -> None:
    from models.vit import load_vit

    encoder = load_vit("dinov2-s")
    model = VGGT(VGGTConfig.small(), enable_track=False).eval()
    load_dinov2_patch_embed_(model, encoder.model.state_dict())
    x = torch.rand(2, 3, 112, 154, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = model.aggregator.patch_embed(encoder.normalize(x))
        _, tokens = encoder.encode(x)
    torch.testing.assert_close(ours, tokens[:, 1:], rtol=1e-4, atol=1e-4)
