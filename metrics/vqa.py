"""VQA metrics: ScienceQA multiple-choice accuracy and VQA/VizWiz soft accuracy, in percent.

ScienceQA (:func:`parse_choice`).  The model is asked to "Answer with the option's letter from
the given choices directly" (or, in the explained format of :mod:`data.vqa.scienceqa`, to end with "The
answer is X"); its free-form output is mapped to an option by, in order:

0. **answer sentence**: the *last* ``answer is X`` (``The answer is B.``, ``answer is (B)``; "answer is"
   in any case, ``X`` a capital) whose ``X`` is an option letter -> that option, whatever else the output
   says (an explanation may hold other capitals: ``A``, ``I``); LLaVA's ScienceQA evaluation parses
   ``The answer is X`` the same way;
1. **letter**: the distinct option letters (``A``.. up to the number of choices) that appear in
   the output as standalone capitals (not inside a word: ``B``, ``B.``, ``(B)``, ``The answer is
   B.``).  Exactly one distinct letter -> that option;
2. **option text**: otherwise, the options whose text occurs in the output as whole words
   (case-insensitive, after whitespace collapsing); options contained in another matching
   option (``cat`` inside ``black cat``) are dropped.  Exactly one left -> that option;
3. otherwise the output is *unparsed* and scored wrong (counted separately as ``parse_failures``).

Accuracy = 100 · correct / questions.

VQA / VizWiz (:func:`vqa_normalize`, :func:`vqa_accuracy`).  Answers are normalised as the
official VQA evaluation (EvalAI) does: newlines/tabs to spaces; punctuation next to a space
(or anywhere, when the answer holds a digit-comma-digit such as ``1,000``) removed, other
punctuation replaced by a space; periods removed unless a digit follows (``2.5`` stays, ``2.`` -> ``2``);
then lower-cased word
by word, number words ``zero``..``ten`` (and ``none``) to digits, articles ``a an the`` dropped,
apostrophe-less contractions restored (``dont`` -> ``don't``).  With the ten human answers
``g_1..g_10`` and the normalised prediction ``p``::

    acc(p) = (1/10) Σ_i min(1, #{j ≠ i : g_j = p} / 3)

the mean over the ten leave-one-out subsets of nine annotators.  Unlike the official script
(which skips normalisation when all ten answers are identical) answers are always normalised,
which can only count a formatting variant of a unanimous answer as correct.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torchmetrics import Metric

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
_STANDALONE_CAPITAL = re.compile(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])")
_ANSWER_SENTENCE = re.compile(r"(?i:answer\s+is)\s*:?\s*\(?([A-Z])(?![A-Za-z])")

_PUNCTUATION = (";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",",
                "?", "!")
_DIGIT_COMMA_DIGIT = re.compile(r"(\d)(,)(\d)")
_PERIOD_NOT_BEFORE_DIGIT = re.compile(r"\.(?!\d)")
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# Contractions written without their apostrophe -> the canonical form (as in the VQA evaluation).
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm", "Ive": "I've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at", "'ow'sat": "'ow's'at",
    "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "shouldve": "should've",
    "shouldnt": "shouldn't", "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've", "they'dve": "they'd've",
    "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas", "wasnt": "wasn't",
    "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't", "whatll": "what'll",
    "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's", "whered": "where'd",
    "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're", "whys": "why's",
    "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't", "wouldnt've": "wouldn't've",
    "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll", "y'allll": "y'all'll",
    "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd",
    "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've",
}
_CONTRACTIONS_LOWER = {k.lower(): v.lower() for k, v in _CONTRACTIONS.items()}


# -- ScienceQA ------------------------------------------------------------------------------------
def _words(text: str) -> str:
    return " ".join(text.lower().split())


def parse_choice(prediction: str, choices: Sequence[str]) -> int | None:
    """Index of the option ``prediction`` names, or ``None`` when unparsed (module docstring)."""
    if not choices:
        raise ValueError("parse_choice needs at least one option")
    if len(choices) > len(LETTERS):
        raise ValueError(f"at most {len(LETTERS)} options can be lettered, got {len(choices)}")
    letters = LETTERS[: len(choices)]
    stated = [c for c in _ANSWER_SENTENCE.findall(prediction) if c in letters]
    if stated:
        return letters.index(stated[-1])
    found = {c for c in _STANDALONE_CAPITAL.findall(prediction) if c in letters}
    if len(found) == 1:
        return letters.index(found.pop())
    text = f" {_words(re.sub(r'[^0-9A-Za-z]+', ' ', prediction))} "
    options = [_words(re.sub(r"[^0-9A-Za-z]+", " ", c)) for c in choices]
    hits = [i for i, o in enumerate(options) if o and f" {o} " in text]
    hits = [i for i in hits if not any(j != i and options[i] != options[j] and options[i] in options[j] for j in hits)]
    return hits[0] if len(hits) == 1 else None


def states_answer(prediction: str, choices: Sequence[str]) -> bool:
    """Whether ``prediction`` holds an answer sentence (rule 0 of the module docstring) naming an option letter."""
    letters = LETTERS[: len(choices)]
    return any(c in letters for c in _ANSWER_SENTENCE.findall(prediction))


class ScienceQAAccuracy(Metric):
    """Multiple-choice accuracy in percent over parsed free-form outputs (:func:`parse_choice`); also the percentage
    of outputs left unparsed (``parse_failures``) and of those decided by an answer sentence (``answer_sentence``,
    rule 0: in the explained format, the rest fell back to a bare letter or to the option's text)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("correct", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("unparsed", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("stated", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], choices: Sequence[Sequence[str]], answers: Sequence[int]) -> None:
        """``predictions[i]`` (decoded text) against option index ``answers[i]`` of ``choices[i]``."""
        if not len(predictions) == len(choices) == len(answers):
            raise ValueError(f"got {len(predictions)} predictions, {len(choices)} choice lists, {len(answers)} answers")
        for pred, opts, answer in zip(predictions, choices, answers):
            if not 0 <= int(answer) < len(opts):
                raise ValueError(f"answer index {answer} is outside the {len(opts)} options {list(opts)}")
            parsed = parse_choice(pred, opts)
            self.stated += int(states_answer(pred, opts))
            self.correct += int(parsed == int(answer))
            self.unparsed += int(parsed is None)
            self.total += 1

    def compute(self) -> dict[str, torch.Tensor]:
        total = self.total.clamp_min(1).double()
        return {"accuracy": 100.0 * self.correct.double() / total, "parse_failures": 100.0 * self.unparsed / total,
                "answer_sentence": 100.0 * self.stated / total}


# -- VQA / VizWiz ---------------------------------------------------------------------------------
def vqa_normalize(answer: str) -> str:
    """The EvalAI/VQA normalisation of one answer (module docstring)."""
    text = answer.replace("\n", " ").replace("\t", " ").strip()
    strip_all = _DIGIT_COMMA_DIGIT.search(text) is not None
    for p in _PUNCTUATION:
        if strip_all or f"{p} " in text or f" {p}" in text:
            text = text.replace(p, "")
        else:
            text = text.replace(p, " ")
    text = _PERIOD_NOT_BEFORE_DIGIT.sub("", text)
    words = []
    for word in text.lower().split():
        word = _NUMBERS.get(word, word)
        if word in _ARTICLES:
            continue
        words.append(_CONTRACTIONS_LOWER.get(word, word))
    return " ".join(words)


def vqa_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """Mean over leave-one-out annotator subsets of ``min(1, matches / 3)`` (a fraction in [0, 1])."""
    if not answers:
        raise ValueError("vqa_accuracy needs the human answers (VizWiz/VQA have ten per question)")
    pred = vqa_normalize(prediction)
    gts = [vqa_normalize(a) for a in answers]
    matches = sum(g == pred for g in gts)
    # leaving annotator i out removes one match exactly when g_i == pred
    return sum(min(1.0, (matches - (g == pred)) / 3.0) for g in gts) / len(gts)


class VQAAccuracy(Metric):
    """VQA/VizWiz soft accuracy in percent (:func:`vqa_accuracy` averaged over questions)."""

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("score", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, predictions: Sequence[str], answers: Sequence[Sequence[str]]) -> None:
        """``predictions[i]`` (decoded text) against the human answers ``answers[i]``."""
        if len(predictions) != len(answers):
            raise ValueError(f"got {len(predictions)} predictions for {len(answers)} answer lists")
        for pred, gts in zip(predictions, answers):
            self.score += vqa_accuracy(pred, gts)
            self.total += 1

    def compute(self) -> dict[str, torch.Tensor]:
        return {"accuracy": 100.0 * self.score / self.total.clamp_min(1).double()}


class VQAScores(torch.nn.Module):
    """Both accuracies behind one ``update(task, ...)``: a VQA test set scores whichever task its batches are."""

    def __init__(self) -> None:
        super().__init__()
        self.scienceqa = ScienceQAAccuracy()
        self.vizwiz = VQAAccuracy()

    def update(self, task: str, predictions: Sequence[str], choices: Sequence[Sequence[str]] = (),
               answer_index: Sequence[int] = (), answers: Sequence[Sequence[str]] = ()) -> None:
        if task == "scienceqa":
            self.scienceqa.update(predictions, choices, answer_index)
        elif task == "vizwiz":
            self.vizwiz.update(predictions, answers)
        else:
            raise ValueError(f"unknown VQA task {task!r}; expected 'scienceqa' or 'vizwiz'")

    def compute(self) -> dict[str, torch.Tensor]:
        """The scores of every task seen since the last reset (``accuracy``, ScienceQA ``parse_failures``); when
        both tasks were seen (a validation loader over both layouts), each key is prefixed by its task
        (``scienceqa/accuracy``, ``vizwiz/accuracy``) so that neither score hides the other."""
        seen = {name: m for name, m in (("scienceqa", self.scienceqa), ("vizwiz", self.vizwiz)) if int(m.total) > 0}
        if len(seen) == 1:
            return dict(next(iter(seen.values())).compute())
        return {f"{name}/{k}": v for name, m in seen.items() for k, v in m.compute().items()}

    def reset(self) -> None:
        self.scienceqa.reset()
        self.vizwiz.reset()


__all__ = ["ScienceQAAccuracy", "VQAAccuracy", "VQAScores", "parse_choice", "states_answer", "vqa_accuracy",
           "vqa_normalize"]
