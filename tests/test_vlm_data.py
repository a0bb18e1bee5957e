"""ScienceQA / VizWiz readers on fixtures in the official formats, prompts, collation and the DataModule splits."""

from __future__ import annotations

import json

import pytest
import torch

from data.vqa import VQACollator, VQADataModule, read_scienceqa, read_vizwiz, scienceqa_prompt, vizwiz_prompt
from data.vqa.synthetic import write_scienceqa, write_vizwiz
from data.vqa.vizwiz import majority_answer
from models.vlm import load_processor
from tests.fixtures_vqa import (
    write_scienceqa_fixture,
    write_vizwiz_fixture,
)

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sqa_root(tmp_path_factory):
    return write_scienceqa_fixture(tmp_path_factory.mktemp("scienceqa"))


@pytest.fixture(scope="module")
def vizwiz_root(tmp_path_factory):
    return write_vizwiz_fixture(tmp_path_factory.mktemp("vizwiz"))


def test_scienceqa_reads_the_image_subset_with_llava_prompts(sqa_root):
    train = read_scienceqa(sqa_root, "train")
    assert [e.qid for e in train] == ["1", "2"]  # problem 3 has no image
    first = train[0]
    assert first.prompt == ("Context: Look at the picture.\nWhich colour is the square?\nA. red\nB. blue\n"
                            "Answer with the option's letter from the given choices directly.")
    assert (first.target, first.answer_index, first.choices) == ("B", 1, ["red", "blue"])
    assert first.image == sqa_root / "images" / "train" / "1" / "image.png" and first.image.is_file()
    assert not train[1].prompt.startswith("Context")  # empty hint: no context line
    test = read_scienceqa(sqa_root, "test")
    assert [(e.qid, e.target) for e in test] == [("5", "C"), ("6", "A")]
    assert [e.qid for e in read_scienceqa(sqa_root, "minitest")] == ["5"]


def test_scienceqa_errors_say_what_is_missing(sqa_root, tmp_path):
    with pytest.raises(FileNotFoundError, match="problems.json"):
        read_scienceqa(tmp_path, "test")
    with pytest.raises(ValueError, match="no split 'dev'"):
        read_scienceqa(sqa_root, "dev")
    broken = write_scienceqa_fixture(tmp_path / "broken")
    splits = json.loads((broken / "pid_splits.json").read_text())
    (broken / "pid_splits.json").write_text(json.dumps({**splits, "test": ["5", "99"]}))
    with pytest.raises(ValueError, match="'99'"):
        read_scienceqa(broken, "test")
    (broken / "images" / "train" / "1" / "image.png").unlink()
    with pytest.raises(FileNotFoundError, match="problem '1'"):
        read_scienceqa(broken, "train")
    with pytest.raises(ValueError, match="2..26 choices"):
        scienceqa_prompt("q", ["only one"])


def test_vizwiz_reader_majority_and_server_only_test(vizwiz_root, tmp_path):
    train = read_vizwiz(vizwiz_root, "train")
    assert [e.qid for e in train] == [f"VizWiz_train_{i:08d}" for i in range(3)]
    assert [e.target for e in train] == ["red", "cup", "unanswerable"]  # "a cup" normalises to "cup"
    assert len(train[0].answers) == 10 and train[0].answers[6] == "Red."
    assert train[0].prompt == vizwiz_prompt("What colour is this?") == (
        "What colour is this?\nWhen the provided information is insufficient, respond with 'Unanswerable'.\n"
        "Answer the question using a single word or phrase.")
    assert majority_answer(["two"] * 5 + ["2"] * 3 + ["3", "x"]) == "2"  # 8 votes once normalised
    assert majority_answer(["blue", "navy", "navy", "blue"]) == "blue"  # tie: the first given
    with pytest.raises(ValueError, match="evaluate on 'val'"):
        read_vizwiz(vizwiz_root, "test")
    with pytest.raises(FileNotFoundError, match="annotations"):
        read_vizwiz(tmp_path, "val")


@pytest.mark.parametrize("family, eos", [("llava", "<eos>"), ("llava_next", "<eos>"),
                                         ("idefics3", "<end_of_utterance>"), ("gemma3", "<end_of_turn>"),
                                         ("qwen2_5_vl", "<|im_end|>"), ("qwen3_vl", "<|im_end|>"),
                                         ("qwen3_5", "<|im_end|>"), ("mistral3", "<eos>"), ("internvl", "<|im_end|>"),
                                         ("llava_onevision", "<eos>"), ("gemma4", "<turn|>")])
def test_collation_masks_the_prompt_and_pads_generation_left(family, eos, sqa_root, vizwiz_root):
    processor = load_processor(f"tiny-{family}")
    tok = processor.tokenizer
    examples = read_scienceqa(sqa_root, "test") + read_vizwiz(vizwiz_root, "val")[:1]
    train = VQACollator(processor, "train")(examples)
    for i, e in enumerate(examples):
        learned = train["labels"][i][train["labels"][i] != -100]
        assert tok.decode(learned).strip() == e.target + eos  # exactly the answer and its EOS
        ids = train["input_ids"][i][train["attention_mask"][i].bool()]
        n = learned.numel()
        # Idefics3's, Gemma 3's and Qwen2.5-VL's templates put a newline after the turn's EOS (not learned)
        last = family in ("llava", "llava_next", "mistral3", "llava_onevision")
        assert torch.equal(ids[-n:], learned) if last else torch.equal(ids[-n - 1:-1], learned)
    # right padding: labels never cover padding
    assert not ((train["labels"] != -100) & (train["attention_mask"] == 0)).any()
    batch = VQACollator(processor, "eval")(examples[:2])
    prompt = batch["prompt"]
    assert (prompt["attention_mask"][:, -1] == 1).all()  # left-padded: every prompt ends the row
    text = tok.decode(prompt["input_ids"][0][prompt["attention_mask"][0].bool()])
    ends = {"idefics3": "Assistant:", "gemma3": "<start_of_turn>model\n", "gemma4": "<|turn>model\n",
            "qwen2_5_vl": "<|im_start|>assistant\n",
            "qwen3_vl": "<|im_start|>assistant\n", "qwen3_5": "<|im_start|>assistant\n",
            "mistral3": "[/INST]", "internvl": "<|im_start|>assistant\n"}
    assert text.endswith(ends.get(family, "ASSISTANT:"))
    assert batch["task"] == "scienceqa" and batch["qid"] == ["5", "6"] and batch["answer_index"] == [2, 0]
    assert batch["choices"] == [["red", "green", "blue"], ["yes", "no"]]
    with pytest.raises(ValueError, match="mixes tasks"):
        VQACollator(processor, "eval")(examples[1:])


def test_datamodule_splits_are_disjoint_and_seeded(tmp_path):
    root = write_scienceqa(tmp_path / "sqa", sizes={"train": 12, "val": 3, "test": 5}, seed=3)
    dm = VQADataModule("scienceqa", root=str(root), processor="tiny-idefics3", calibration_samples=4,
                       finetune_samples=6, validation_samples=2, seed=1)
    calib = [e.qid for e in dm.examples("calibration")]
    finetune = [e.qid for e in dm.examples("finetune")]
    assert len(calib) == 4 and len(finetune) == 6 and not set(calib) & set(finetune)
    assert len(dm.examples("validation")) == 2 and len(dm.examples("test")) == 5  # text-only problems dropped
    again = VQADataModule("scienceqa", root=str(root), processor="tiny-idefics3", calibration_samples=4, seed=1)
    assert [e.qid for e in again.examples("calibration")] == calib
    other = VQADataModule("scienceqa", root=str(root), processor="tiny-idefics3", calibration_samples=4, seed=2)
    assert [e.qid for e in other.examples("calibration")] != calib
    assert dm.test_names == ["scienceqa_img_test"]
    batch = next(iter(dm.calibration_dataloader()))
    assert batch["input_ids"].shape[0] == 1 and "labels" in batch  # one unpadded example per calibration batch
    with pytest.raises(ValueError, match="dataset must be one of"):
        VQADataModule("gqa")


def test_synthetic_vizwiz_matches_the_official_schema(tmp_path, monkeypatch):
    monkeypatch.setenv("SVD_VGGT_CACHE", str(tmp_path / "cache"))
    root = write_vizwiz(tmp_path / "vw", sizes={"train": 10, "val": 5, "test": 2}, seed=0)
    records = json.loads((root / "annotations" / "train.json").read_text())
    assert set(records[0]) == {"image", "question", "answers", "answerable", "answer_type"}
    assert all(len(r["answers"]) == 10 and set(r["answers"][0]) == {"answer", "answer_confidence"} for r in records)
    assert "answers" not in json.loads((root / "annotations" / "test.json").read_text())[0]
    assert len(read_vizwiz(root, "val")) == 5
    dm = VQADataModule("vizwiz", root="synthetic", processor="tiny-llava", calibration_samples=2, test_samples=3)
    assert dm.test_names == ["vizwiz_val"] and len(dm.examples("test")) == 3
    assert (tmp_path / "cache" / "vqa-synthetic" / "vizwiz-v1-seed0" / "annotations" / "val.json").is_file()


def test_evaluation_reads_only_the_split_it_scores(tmp_path):
    root = write_scienceqa_fixture(tmp_path / "sqa")
    splits = json.loads((root / "pid_splits.json").read_text())
    (root / "pid_splits.json").write_text(json.dumps({k: v for k, v in splits.items() if k != "train"}))
    dm = VQADataModule("scienceqa", root=str(root), processor="tiny-llava")
    assert [e.qid for e in dm.examples("test")] == ["5", "6"]  # no training split needed to evaluate
    with pytest.raises(ValueError, match="no split 'train'"):
        dm.calibration_dataloader()
