"""VLM loading: tiny models of each family, family dispatch by config class, local folders, offline errors."""

from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from lightning_modules import VLMSpec
from models.vlm import family_of, load_vlm, save_vlm, vlm_parts
from models.vlm_tiny import build_tiny_vlm, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")

FAMILIES = ["llava", "llava_next", "idefics3", "gemma3", "qwen2_5_vl", "qwen3_vl", "qwen3_5", "mistral3", "internvl",
            "llava_onevision", "gemma4"]
NESTED = ("idefics3", "gemma3", "gemma4")  # processors taking one list of images per text
PARTS = {
    "gemma3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "gemma4": ("model.vision_tower", "model.embed_vision", "model.language_model"),
    "qwen2_5_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen3_vl": ("model.visual", "model.visual.merger", "model.language_model"),
    "qwen3_5": ("model.visual", "model.visual.merger", "model.language_model"),
    "mistral3": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "internvl": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava_onevision": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "llava_next": ("model.vision_tower", "model.multi_modal_projector", "model.language_model"),
    "idefics3": ("model.vision_model", "model.connector", "model.text_model"),
}


def _inputs(processor, family):
    img = Image.new("RGB", (30, 40), (200, 30, 30))
    turn = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What?"}]}]
    prompt = processor.apply_chat_template(turn, add_generation_prompt=True)
    return dict(processor(images=[[img]] if family in NESTED else [img], text=[prompt], return_tensors="pt"))


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_vlm_parts_and_save_load_round_trip(family, tmp_path):
    model, processor = build_tiny_vlm(family, seed=3)
    assert family_of(model).name == family and family_of(model.config).name == family
    parts = vlm_parts(model)
    assert (parts["vision_tower"], parts["projector"], parts["language_model"]) == PARTS[family]
    assert parts["lm_head"] == "lm_head"
    # the residual-stream writers rotation finds structurally agree with the family table
    from models.layouts import layout_of
    from models.vlm import FAMILIES

    layout = layout_of(model)
    assert list(layout.stream_vectors) == list(FAMILIES[family].stream_vectors)
    if FAMILIES[family].projector_out is None:  # Gemma 3: a raw projection matrix, its LM rotated at the readers
        assert layout.writers == () and not any(isinstance(m, torch.nn.Linear) for m in
                                                 model.get_submodule(parts["projector"]).modules())
    else:
        assert layout.writers[0].startswith(parts["projector"] + ".")  # then Qwen3-VL's deepstack mergers
        assert len(layout.writers) == (2 if family == "qwen3_vl" else 1)
        for writer in layout.writers:
            assert isinstance(model.get_submodule(writer), torch.nn.Linear)
            assert model.get_submodule(writer).out_features == model.config.get_text_config().hidden_size
    inputs = _inputs(processor, family)
    with torch.no_grad():
        ref = model(**inputs).logits
    assert torch.isfinite(ref).all() and ref.shape[-1] == len(processor.tokenizer)
    folder = save_vlm(model, processor, tmp_path / family)
    loaded, loaded_processor = load_vlm(str(folder))
    assert type(loaded) is type(model)
    again = _inputs(loaded_processor, family)
    assert torch.equal(again["input_ids"], inputs["input_ids"])
    with torch.no_grad():
        torch.testing.assert_close(loaded(**again).logits, ref, rtol=0, atol=1e-6)
    # the same seed builds the same weights; another seed does not
    assert torch.equal(build_tiny_vlm(family, seed=3)[0].lm_head.weight, model.lm_head.weight)
    assert not torch.equal(build_tiny_vlm(family, seed=4)[0].lm_head.weight, model.lm_head.weight)


def test_unsupported_and_missing_models_explain_themselves(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="hf download llava-hf/llava-1.5-7b-hf"):
        load_vlm("llava-hf/llava-1.5-7b-hf-not-cached")
    with pytest.raises(FileNotFoundError, match="no VLM folder"):
        load_vlm(str(tmp_path / "missing" / "model"))
    original = tmp_path / "liuhaotian"
    original.mkdir()
    (original / "config.json").write_text(json.dumps({"model_type": "llava_llama"}))
    with pytest.raises(ValueError, match="llava-hf/llava-1.5-7b-hf"):
        load_vlm(str(original))
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_vlm(str(tmp_path))
    with pytest.raises(ValueError, match="no tiny VLM"):
        load_vlm("tiny-qwen2_vl")
    from transformers import LlamaConfig

    with pytest.raises(ValueError, match="not a supported VLM config"):
        family_of(LlamaConfig())


def test_default_targets_per_part():
    model, processor = build_tiny_vlm("llava")
    lm_only = VLMSpec(model=model, processor=processor).default_targets(model)
    assert len(lm_only) == 2 * 7 and all(n.startswith("model.language_model.layers.") for n in lm_only)
    spec = VLMSpec(model=model, processor=processor, compress_vision=True, compress_projector=True)
    both = spec.default_targets(model)
    vision = [n for n in both if n.startswith("model.vision_tower.")]
    assert len(vision) == 2 * 6  # q, k, v, out_proj, fc1, fc2 per CLIP layer
    assert [n for n in both if "projector" in n] == ["model.multi_modal_projector.linear_1",
                                                      "model.multi_modal_projector.linear_2"]
    assert "lm_head" not in both
    spec = VLMSpec(model=model, processor=processor, quantize_vision=False)
    assert spec.quant_exclude(model) == ["lm_head", "model.vision_tower.*"]
    with pytest.raises(ValueError, match="both `model` and `processor`"):
        VLMSpec(model=model)


def test_tiny_config_ties_embeddings_on_request():
    model, _ = build_tiny_vlm("idefics3", tie_word_embeddings=True)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    from models.vlm_tiny import build_tiny_tokenizer

    cfg = tiny_config("llava_next", build_tiny_tokenizer("llava_next"))
    assert cfg.image_grid_pinpoints == [[28, 28], [28, 56], [56, 28]]


def test_gemma3_image_tokens_attend_both_ways_and_its_projector_is_no_target():
    """Gemma 3's processor marks the image tokens (``token_type_ids``); the model lets them attend to each other
    both ways, so dropping the ids changes the logits.  Its projector holds no nn.Linear: asking to compress it is
    refused by name instead of silently compressing nothing."""
    model, processor = build_tiny_vlm("gemma3")
    inputs = _inputs(processor, "gemma3")
    image = processor.tokenizer.image_token_id
    assert torch.equal(inputs["token_type_ids"].bool(), inputs["input_ids"] == image)
    assert int((inputs["input_ids"] == image).sum()) == model.config.mm_tokens_per_image == 4
    with torch.no_grad():
        both = model(**inputs).logits
        causal = model(**{k: v for k, v in inputs.items() if k != "token_type_ids"}).logits
    assert (both - causal).abs().max() > 1e-3
    with pytest.raises(ValueError, match="Gemma3MultiModalProjector.*compress_projector: false"):
        VLMSpec(model=model, processor=processor, compress_projector=True).default_targets(model)
    names = VLMSpec(model=model, processor=processor, compress_vision=True).default_targets(model)
    assert len(names) == 2 * 7 + 2 * 6  # LM: q, k, v, o, gate, up, down; SigLIP: q, k, v, out_proj, fc1, fc2


def test_qwen2_vl_parts_layout_and_rotation_with_images():
    """Qwen2-VL (the Qwen2.5-VL family's predecessor: no window attention, LayerNorm ViT blocks) resolves to the same
    parts; its language model's layout names the merger's last Linear as the stream writer and refuses the latent
    cache (multimodal RoPE); the fused rotation keeps float64 logits with an image."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    from compression.rotation import rotate_model_
    from models.layouts import layout_of
    from models.vlm_tiny import build_tiny_processor, tiny_config

    processor = build_tiny_processor("qwen2_5_vl")  # same tokens, image processor and template
    text = tiny_config("qwen2_5_vl", processor.tokenizer).text_config.to_dict()
    config = Qwen2VLConfig(text_config=text, vision_config=dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"],
                                                                num_heads=2, mlp_ratio=2, patch_size=14,
                                                                spatial_merge_size=2, temporal_patch_size=2),
                           image_token_id=processor.image_token_id, video_token_id=processor.video_token_id,
                           vision_start_token_id=processor.tokenizer.convert_tokens_to_ids("<|vision_start|>"))
    torch.manual_seed(0)
    model = Qwen2VLForConditionalGeneration(config).double().eval()
    assert family_of(model).name == "qwen2_vl"
    parts = vlm_parts(model)
    assert (parts["vision_tower"], parts["projector"], parts["language_model"]) == PARTS["qwen2_5_vl"]
    layout = layout_of(model)
    assert layout.writers == ("model.visual.merger.mlp.2",) and not layout.supports("latent_cache")
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in _inputs(processor, "qwen2_5_vl").items()}
    with torch.no_grad():
        ref = model(**inputs).logits
    entry = rotate_model_(model, layout, seed=2)
    assert entry["site"] == "stream" and entry["stream_writers"]["linears"] == ["model.visual.merger.mlp.2"]
    with torch.no_grad():
        assert (model(**inputs).logits - ref).abs().max() < 1e-6 * ref.abs().max()


def test_qwen3_5_moe_parts_layout_and_rotation_with_images():
    """Qwen3.5-MoE (Qwen3.5 with Qwen2-MoE experts in its hybrid decoder) resolves to Qwen3.5's parts; its layout
    reads each linear attention through its four projections, routes the MLPs through experts and refuses the latent
    cache; ``VLMSpec.build`` turns the 3-D experts into ``nn.Linear`` and lists them in ``forms``; the fused rotation
    keeps float64 logits with an image."""
    from transformers import Qwen3_5MoeConfig, Qwen3_5MoeForConditionalGeneration

    from compression.rotation import rotate_model_
    from models.layouts import layout_of
    from models.vlm_tiny import build_tiny_processor, tiny_config

    processor = build_tiny_processor("qwen3_5")
    tiny = tiny_config("qwen3_5", processor.tokenizer)
    text = dict(tiny.text_config.to_dict(), num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                shared_expert_intermediate_size=32)
    config = Qwen3_5MoeConfig(text_config=text, vision_config=tiny.vision_config.to_dict(),
                              image_token_id=tiny.image_token_id, video_token_id=tiny.video_token_id,
                              vision_start_token_id=tiny.vision_start_token_id)
    torch.manual_seed(0)
    model = Qwen3_5MoeForConditionalGeneration(config).eval()
    spec = VLMSpec(model=model, processor=processor)
    assert spec.build() is model  # the spec turns the 3-D experts into nn.Linear (float64 can run those)
    assert sorted(spec.forms["experts"]) == ["model.language_model.layers.0.mlp.experts",
                                              "model.language_model.layers.1.mlp.experts"], spec.forms
    model = model.double()
    assert family_of(model).name == "qwen3_5_moe"
    parts = vlm_parts(model)
    assert (parts["vision_tower"], parts["projector"], parts["language_model"]) == PARTS["qwen3_5"]
    layout = layout_of(model)
    assert layout.writers == ("model.visual.merger.linear_fc2",) and not layout.supports("latent_cache")
    assert [len(b.attn.inputs) for b in layout.blocks] == [4, 0] and all(b.mlp.kind == "moe" for b in layout.blocks)
    inputs = {k: v.double() if v.is_floating_point() else v for k, v in _inputs(processor, "qwen3_5").items()}
    with torch.no_grad():
        ref = model(**inputs).logits
    entry = rotate_model_(model, layout, seed=2)
    assert entry["stream_writers"]["linears"] == ["model.visual.merger.linear_fc2"]
    with torch.no_grad():
        assert (model(**inputs).logits - ref).abs().max() < 1e-6 * ref.abs().max()


def test_gemma4_image_tokens_attend_both_ways_and_its_clippable_qkv_group_only_unclamped():
    """Gemma 4's processor marks the image tokens (``mm_token_type_ids``), which attend to each other both ways.  Its
    ViT wraps q/k/v in ``Gemma4ClippableLinear``: the inner linears form the joint group, unless the wrappers clamp
    their inputs (``use_clipped_linears``), when each projection reads its own clamped copy and there is no group."""
    from compression.joint import find_joint_groups
    from models.layouts import layout_of

    model, processor = build_tiny_vlm("gemma4")
    inputs = _inputs(processor, "gemma4")
    image = processor.tokenizer.image_token_id
    assert torch.equal(inputs["mm_token_type_ids"].bool(), inputs["input_ids"] == image)
    assert 0 < int((inputs["input_ids"] == image).sum()) <= 70  # aspect-preserving, at most 70 soft tokens
    with torch.no_grad():
        both = model(**inputs).logits
        causal = model(**{k: v for k, v in inputs.items() if k != "mm_token_type_ids"}).logits
    assert (both - causal).abs().max() > 1e-3
    attn = "model.vision_tower.encoder.layers.0.self_attn"
    groups = find_joint_groups(model, layout_of(model))
    assert groups[attn] == [f"{attn}.{p}_proj.linear" for p in "qkv"]
    for p in "qkv":
        getattr(model.get_submodule(attn), f"{p}_proj").use_clipped_linears = True
    assert attn not in find_joint_groups(model, layout_of(model))
