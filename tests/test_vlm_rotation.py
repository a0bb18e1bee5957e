"""Fused residual rotation on the language model of each tiny VLM (float64, image inputs), stream writers,
plan rebuild, and joint QKV of both towers -- including why a fused ``qkv`` Linear needs no joint group."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from compression import (
    LowRankLinear,
    Recipe,
    apply_plan,
    collect_stats,
    compress_,
    find_joint_groups,
)
from compression.rotation import rotate_model_
from data.vqa import VQACollator, VQAExample
from lightning_modules import ModelSpec
from lightning_modules.vlm_spec import model_inputs
from models.layouts import layout_of
from models.vlm import vlm_parts
from models.vlm_tiny import build_tiny_vlm

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llava", "llava_next", "idefics3", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "mistral3", "internvl",
            "llava_onevision"]
WRITERS = {
    "llava_onevision": {"linears": ["model.multi_modal_projector.linear_2"], "vectors": ["model.image_newline"]},
    "internvl": {"linears": ["model.multi_modal_projector.linear_2"], "vectors": []},
    "mistral3": {"linears": ["model.multi_modal_projector.linear_2"], "vectors": []},
    "qwen3_vl": {"linears": ["model.visual.merger.linear_fc2", "model.visual.deepstack_merger_list.0.linear_fc2"],
                 "vectors": []},
    "qwen2_5_vl": {"linears": ["model.visual.merger.mlp.2"], "vectors": []},
    "qwen3_5": {"linears": ["model.visual.merger.linear_fc2"], "vectors": []},
    "llava": {"linears": ["model.multi_modal_projector.linear_2"], "vectors": []},
    "llava_next": {"linears": ["model.multi_modal_projector.linear_2"], "vectors": ["model.image_newline"]},
    "idefics3": {"linears": ["model.connector.modality_projection.proj"], "vectors": []},
}


def _batch(processor, tmp_path, n=2):
    from PIL import Image

    examples = []
    for i in range(n):
        path = tmp_path / f"img{i}.png"
        Image.new("RGB", (30 + 10 * i, 40), (60 * i, 100, 200)).save(path)  # two shapes: two AnyRes grids
        examples.append(VQAExample(str(i), path, f"Question {i}?", "B", "scienceqa", ["x", "y"], 1))
    return model_inputs(VQACollator(processor, "train")(examples))


def _double(batch):
    return {k: v.double() if torch.is_tensor(v) and v.is_floating_point() else v for k, v in batch.items()}


def _logits(model, batch):
    with torch.no_grad():
        return model(**batch, use_cache=False).logits


def _random_norms_(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name and p.dim() == 1:
                p.copy_(1.0 + 0.5 * torch.rand_like(p))


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("tie", [False, True])
def test_fused_rotation_keeps_vlm_logits_with_images(family, tie, tmp_path):
    model, processor = build_tiny_vlm(family, tie_word_embeddings=tie)
    model = model.double()
    _random_norms_(model)
    batch = _double(_batch(processor, tmp_path))
    layout = layout_of(model)
    assert {"linears": list(layout.writers), "vectors": list(layout.stream_vectors)} == WRITERS[family]
    groups = find_joint_groups(model, layout_of(model))  # both towers: LM self_attn and vision self_attn
    parts = vlm_parts(model)
    # Qwen-VL's ViT has one fused qkv per block: compressing it is the joint factorization, no group needed
    tower = {"qwen2_5_vl": None, "qwen3_vl": None, "qwen3_5": None, "mistral3": ".transformer"}.get(family, ".encoder")
    vision = set() if tower is None else {f"{parts['vision_tower']}{tower}"}
    assert {re.split(r"\.layers?\.", g)[0] for g in groups} == {f"{parts['language_model']}"} | vision
    stats = collect_stats(model, [n for g in groups.values() for n in g], [batch], forward=lambda m, b: m(**b))
    class Both:  # joint groups in both towers (the LM spec would name only the language model's)
        @staticmethod
        def joint_groups(model, targets):
            return groups

    report = compress_(model, Recipe("svd_llm_v2", ratio=0.3, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"]),
                       stats, family=Both())
    compress_(model, Recipe("svd", ratio=0.3, targets=["o_proj", "down_proj", parts["projector"] + ".*"]))
    ref = _logits(model, batch)
    entry = rotate_model_(model, layout_of(model), kind="random_hadamard", seed=3)
    assert entry["stream_writers"] == WRITERS[family] and (entry["untied"] is not None) == tie
    assert model.lm_head.weight is not model.get_input_embeddings().weight
    torch.testing.assert_close(_logits(model, batch), ref, rtol=0, atol=1e-6)
    assert (ref - _logits(model, batch)).abs().max() < 1e-6 * ref.abs().max() + 1e-6
    # the plan rebuilds untied head, Hadamard MLPs and joint groups on a fresh model; the state dict loads strictly
    fresh = build_tiny_vlm(family, seed=9, tie_word_embeddings=tie)[0].double()
    changed = apply_plan(fresh, {**report.plan, "rotation": entry})
    assert f"{parts['language_model']}.layers.1.mlp" in changed
    compress_(fresh, Recipe("svd", ratio=0.3, targets=["o_proj", "down_proj", parts["projector"] + ".*"]))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


@pytest.mark.parametrize("family", ["llava_next", "idefics3", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "mistral3",
                                    "internvl", "llava_onevision"])
def test_projector_output_must_be_rotated(family, tmp_path):
    """Without rotating the stream writers the image tokens enter the rotated stream unrotated."""
    model, processor = build_tiny_vlm(family)
    model = model.double()
    batch = _double(_batch(processor, tmp_path))
    ref = _logits(model, batch)
    rotate_model_(model, layout_of(model), seed=1, writers={"linears": [], "vectors": []})
    assert (_logits(model, batch) - ref).abs().max() > 1e-3


class _SplitAttention(nn.Module):
    """q/k/v as three Linears cut from a fused ``qkv`` Linear."""

    def __init__(self, qkv: nn.Linear) -> None:
        super().__init__()
        d = qkv.out_features // 3
        self.q_proj, self.k_proj, self.v_proj = (nn.Linear(qkv.in_features, d).double() for _ in range(3))
        with torch.no_grad():
            for i, lin in enumerate((self.q_proj, self.k_proj, self.v_proj)):
                lin.weight.copy_(qkv.weight[i * d:(i + 1) * d])
                lin.bias.copy_(qkv.bias[i * d:(i + 1) * d])

    def forward(self, x):
        return torch.cat([self.q_proj(x), self.k_proj(x), self.v_proj(x)], -1)


def test_fused_qkv_compressed_per_matrix_is_the_joint_factorization():
    """A timm ViT attention has one fused ``qkv`` Linear: compressing it alone at rank r gives exactly
    the joint q/k/v factorization at rank r (same stacked weight, same shared input statistics)."""
    from timm.models.vision_transformer import Attention

    torch.manual_seed(0)
    fused = nn.Sequential(Attention(dim=32, num_heads=4, qkv_bias=True)).double()
    split = _SplitAttention(fused[0].qkv)
    assert ModelSpec().joint_groups(fused, ["0.qkv", "0.proj"]) == {}  # no q/k/v trio: nothing to group
    groups = {"": ["q_proj", "k_proj", "v_proj"]}  # a module without a transformers layout: groups given

    class Given:
        @staticmethod
        def joint_groups(model, targets):
            return groups

    batches = [torch.randn(2, 20, 32, dtype=torch.float64) for _ in range(3)]
    fused_stats = collect_stats(fused, ["0.qkv"], batches)
    split_stats = collect_stats(split, ["q_proj", "k_proj", "v_proj"], batches)
    rank = 12
    dense = fused[0].qkv.weight.detach().clone()
    compress_(fused, Recipe("svd_llm_v2", targets=["0.qkv"], overrides={"0.qkv": {"rank": rank}}), fused_stats)
    compress_(split, Recipe("svd_llm_v2", joint_qkv=True, overrides={"*": {"rank": rank}}), split_stats, family=Given())
    layer = fused[0].qkv
    assert isinstance(layer, LowRankLinear) and layer.rank == rank
    per_matrix = layer.up.weight @ layer.down.weight
    ups = torch.cat([getattr(split, n).up.weight for n in ("q_proj", "k_proj", "v_proj")])
    joint = ups @ split.qkv_latent.down.weight
    torch.testing.assert_close(per_matrix, joint, rtol=0, atol=1e-10)
    x = torch.randn(5, 32, dtype=torch.float64)
    torch.testing.assert_close(layer(x), split(x), rtol=0, atol=1e-10)
    assert (per_matrix - dense).abs().max() > 1e-3  # a real truncation (rank 12 of 32), not the dense weight


@pytest.mark.parametrize("family", ["gemma3", "gemma4"])
@pytest.mark.parametrize("tie", [False, True])
def test_gemma_vlm_rotates_its_language_model_at_the_readers(family, tie, tmp_path):
    """Gemma 3's and Gemma 4's text decoders have post-norms, so their rotation rides on the reader norms' outputs:
    nothing is folded, the head stays as it was (tied or not), the stream and the projector output are untouched, and
    the logits with images stay to float64 rounding; the plan rebuilds the online rotations on a fresh model
    bit-exactly."""
    model, processor = build_tiny_vlm(family, tie_word_embeddings=tie)
    model = model.double()
    _random_norms_(model)
    batch = _double(_batch(processor, tmp_path))
    assert {"gemma3": "token_type_ids", "gemma4": "mm_token_type_ids"}[family] in batch
    groups = find_joint_groups(model, layout_of(model))
    stats = collect_stats(model, [n for g in groups.values() for n in g], [batch], forward=lambda m, b: m(**b))

    class Both:
        @staticmethod
        def joint_groups(model, targets):
            return groups

    report = compress_(model, Recipe("svd_llm_v2", ratio=0.3, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"]),
                       stats, family=Both())
    compress_(model, Recipe("svd", ratio=0.3, targets=["o_proj", "down_proj"]))
    ref = _logits(model, batch)
    entry = rotate_model_(model, layout_of(model), kind="random_hadamard", seed=3)
    assert entry["site"] == "readers" and entry["untied"] is None and "stream_writers" not in entry
    assert len(entry["rotated_outputs"]) == 2 * 2  # input_layernorm, pre_feedforward_layernorm per layer
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tie
    assert (_logits(model, batch) - ref).abs().max() < 1e-9 * ref.abs().max()
    fresh = build_tiny_vlm(family, seed=9, tie_word_embeddings=tie)[0].double()
    apply_plan(fresh, {**report.plan, "rotation": entry})
    compress_(fresh, Recipe("svd", ratio=0.3, targets=["o_proj", "down_proj"]))
    fresh.load_state_dict(model.state_dict(), strict=True)
    assert torch.equal(_logits(fresh, batch), _logits(model, batch))


def test_qwen3_vl_deepstack_mergers_write_into_the_stream(tmp_path):
    """Qwen3-VL adds its deepstack mergers' output to the stream after the first decoder layer: rotating only the
    main merger leaves those image features unrotated and the logits move."""
    model, processor = build_tiny_vlm("qwen3_vl")
    model = model.double()
    batch = _double(_batch(processor, tmp_path))
    ref = _logits(model, batch)
    main_only = {"linears": ["model.visual.merger.linear_fc2"], "vectors": []}
    rotate_model_(model, layout_of(model), seed=1, writers=main_only)
    assert (_logits(model, batch) - ref).abs().max() > 1e-3
