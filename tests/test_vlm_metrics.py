"""ScienceQA option parsing and VQA/VizWiz accuracy against hand-computed cases."""

from __future__ import annotations

import pytest
import torch

from metrics.vqa import ScienceQAAccuracy, VQAAccuracy, VQAScores, parse_choice, vqa_accuracy, vqa_normalize

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("text, choices, expected", [
    ("B", ["red", "blue"], 1),
    ("B.", ["red", "blue"], 1),
    ("(A)", ["red", "blue"], 0),
    ("The answer is C.", ["x", "y", "z"], 2),
    ("I think it is C", ["x", "y", "z"], 2),        # "I" is not an option letter of three choices
    ("D", ["red", "blue"], None),                    # not a valid letter, no option text
    ("A or B", ["red", "blue"], None),               # two letters, no option text
    ("blue", ["red", "blue"], 1),                    # option text
    ("It is a black cat.", ["cat", "black cat", "dog"], 1),  # "cat" lies inside "black cat"
    ("red and blue", ["red", "blue"], None),         # two option texts
    ("reddish", ["red", "blue"], None),              # whole words only
    ("", ["red", "blue"], None),
    # the answer sentence (explained format) decides, whatever other capitals the explanation holds
    ("A picture of a shoe. The answer is B.", ["bag", "shoe"], 1),
    ("The picture shows: I. The answer is (C)", ["x", "y", "z"], 2),
    ("The answer is A. No: the answer is C.", ["x", "y", "z"], 2),  # the last answer sentence counts
    ("answer is: B", ["red", "blue"], 1),
    ("The answer is D. It is red.", ["red", "blue"], 0),  # D is no option: the rules after it apply (text)
    ("The answer is Apple.", ["red", "blue"], None),     # a word, not a letter
])
def test_parse_choice(text, choices, expected):
    assert parse_choice(text, choices) == expected


def test_parse_choice_rejects_bad_options():
    with pytest.raises(ValueError, match="at least one option"):
        parse_choice("A", [])


@pytest.mark.parametrize("raw, normalised", [
    ("Two dogs.", "2 dogs"),
    ("the RED", "red"),
    ("dont know", "don't know"),
    ("1,000", "1000"),
    ("yes!", "yes"),
    ("2.5", "2.5"),
    ("2.", "2"),
    ("black-and-white", "black and white"),   # no space next to '-': replaced by a space
    ("black - white", "black white"),          # next to a space: removed
    ("  an\tapple\n", "apple"),
    ("None", "0"),
])
def test_vqa_normalize(raw, normalised):
    assert vqa_normalize(raw) == normalised


def test_vqa_accuracy_hand_computed():
    three_red = ["red"] * 3 + ["blue"] * 7
    # leave-one-out: the 3 subsets without a "red" annotator see 2 matches (2/3), the other 7 see 3 (1)
    assert vqa_accuracy("red", three_red) == pytest.approx((3 * 2 / 3 + 7 * 1) / 10)  # 0.9
    assert vqa_accuracy("Blue.", three_red) == 1.0
    assert vqa_accuracy("green", three_red) == 0.0
    two_red = ["red"] * 2 + ["blue"] * 8
    assert vqa_accuracy("red", two_red) == pytest.approx((2 * 1 / 3 + 8 * 2 / 3) / 10)  # 0.6
    one = ["red"] + ["blue"] * 9
    assert vqa_accuracy("the red", one) == pytest.approx(9 * (1 / 3) / 10)  # 0.3
    assert vqa_accuracy("2", ["two"] * 10) == 1.0  # number words normalise to digits
    with pytest.raises(ValueError, match="human answers"):
        vqa_accuracy("x", [])


def test_metric_classes_accumulate_and_reset():
    sqa = ScienceQAAccuracy()
    sqa.update(["A", "The answer is B.", "blue", "no idea"], [["r", "b"], ["r", "b"], ["red", "blue"], ["r", "b"]],
               [0, 0, 1, 1])
    out = sqa.compute()
    assert float(out["accuracy"]) == pytest.approx(50.0)  # A (right), B (wrong), blue (right), unparsed (wrong)
    assert float(out["parse_failures"]) == pytest.approx(25.0)
    assert float(out["answer_sentence"]) == pytest.approx(25.0)  # only "The answer is B." states its answer
    with pytest.raises(ValueError, match="outside"):
        sqa.update(["A"], [["r", "b"]], [2])
    vqa = VQAAccuracy()
    vqa.update(["red", "green"], [["red"] * 3 + ["blue"] * 7, ["green"] * 10])
    assert float(vqa.compute()["accuracy"]) == pytest.approx(100 * (0.9 + 1.0) / 2)
    scores = VQAScores()
    scores.update("vizwiz", ["red"], answers=[["red"] * 10])
    assert set(scores.compute()) == {"accuracy"}
    scores.update("scienceqa", ["A"], choices=[["x", "y"]], answer_index=[1])
    both = scores.compute()
    assert set(both) == {"scienceqa/accuracy", "scienceqa/parse_failures", "scienceqa/answer_sentence",
                         "vizwiz/accuracy"}
    assert float(both["scienceqa/accuracy"]) == 0.0 and float(both["vizwiz/accuracy"]) == 100.0
    scores.reset()
    assert scores.compute() == {}
    assert isinstance(sqa.correct, torch.Tensor)
    with pytest.raises(ValueError, match="unknown VQA task"):
        scores.update("gqa", ["x"])
