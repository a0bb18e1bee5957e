"""ScienceQA in its official release format; the image subset (ScienceQA-IMG) as :class:`VQAExample`.

Layout under ``root`` (the release, as LLaVA's evaluation reads it)::

    problems.json       {"<pid>": {"question", "choices": [...], "answer": <index>, "hint", "image": "image.png" | null,
                         "split": "train" | "val" | "test" | ..., "subject", "grade", "lecture", "solution", ...}}
    pid_splits.json     {"train": [pid, ...], "val": [...], "test": [...], "minival": [...], ...}
    images/<split>/<pid>/image.png

The image subset is the problems whose ``image`` is set (2,017 of the 4,241 test problems).  The
user text is LLaVA's multiple-choice format (the ``CQM`` order: context, question, options)::

    Context: <hint>            (this line only when the hint is not empty)
    <question>
    A. <option 0>
    B. <option 1>
    ...
    Answer with the option's letter from the given choices directly.

and the training target is the correct option's letter (``answer_format="letter"``, the default).

``answer_format="explained"`` is the ScienceQA paper's QCM->EA output format (explanation, then answer):
the last line of the prompt asks for an explanation first (:data:`INSTRUCTION_EXPLAINED`) and the target is
the problem's ``solution`` followed by the answer sentence, ``"<solution> The answer is B."`` (just
``"The answer is B."`` when the solution is empty).  LLaVA's ScienceQA evaluation parses that final
``The answer is X``; so does :func:`metrics.vqa.parse_choice`.

``answer_format="scan"`` adds a check of the options in order after the explanation, up to the right one:
``"<solution> A is <option A>. B is <option B>. The answer is B."`` (:data:`INSTRUCTION_SCAN`).  Every step is
a copy a small language model does well: the next letter of a fixed sequence, the text printed after that
letter in the prompt (an induction copy), and at the end the most recent letter.  The explained format asks
instead for the letter printed *before* the named option, which SmolLM2-135M did not learn in 180 steps
(docs/results/vlm_real.md).  Scoring: :mod:`metrics.vqa`.
"""

from __future__ import annotations

import logging
from pathlib import Path

from data.jsonfiles import DataFileError, load_json
from data.vqa.common import VQAExample
from metrics.vqa import LETTERS

log = logging.getLogger(__name__)

INSTRUCTION = "Answer with the option's letter from the given choices directly."
INSTRUCTION_EXPLAINED = "Explain briefly, then end with 'The answer is' and the option's letter."
INSTRUCTION_SCAN = "Explain briefly, check the options in order, then end with 'The answer is' and the option's letter."
ANSWER_FORMATS = ("letter", "explained", "scan")
_INSTRUCTIONS = {"letter": INSTRUCTION, "explained": INSTRUCTION_EXPLAINED, "scan": INSTRUCTION_SCAN}
_REQUIRED = ("question", "choices", "answer")


def _check_format(answer_format: str) -> None:
    if answer_format not in ANSWER_FORMATS:
        raise ValueError(f"ScienceQA answer_format must be one of {ANSWER_FORMATS}, got {answer_format!r}")


def scienceqa_prompt(question: str, choices: list[str], hint: str = "", answer_format: str = "letter") -> str:
    """The user text of one problem (module docstring)."""
    _check_format(answer_format)
    if len(choices) < 2 or len(choices) > len(LETTERS):
        raise ValueError(f"a ScienceQA problem needs 2..{len(LETTERS)} choices, got {len(choices)}")
    lines = [f"Context: {hint.strip()}"] if hint and hint.strip() else []
    lines.append(question.strip())
    lines += [f"{LETTERS[i]}. {c}" for i, c in enumerate(choices)]
    lines.append(_INSTRUCTIONS[answer_format])
    return "\n".join(lines)


def scienceqa_target(answer: int, solution: str = "", answer_format: str = "letter",
                     choices: list[str] | None = None) -> str:
    """The training answer of a problem whose correct option is ``answer`` (module docstring); the ``scan`` format
    needs the ``choices``."""
    _check_format(answer_format)
    letter = LETTERS[answer]
    if answer_format == "letter":
        return letter
    parts = [" ".join(str(solution or "").split())]
    if answer_format == "scan":
        if choices is None or not 0 <= answer < len(choices):
            raise ValueError(f"the scan format needs the choices, with the answer {answer} among them; got {choices}")
        parts += [f"{LETTERS[i]} is {' '.join(str(c).split())}." for i, c in enumerate(choices[: answer + 1])]
    parts.append(f"The answer is {letter}.")
    return " ".join(x for x in parts if x)


def option_targets(choices: list[str], answer: int, solution: str = "",
                   answer_format: str = "letter") -> list[str] | None:
    """The training target the problem would have if each option were the right one, for likelihood scoring (as an
    lm-eval-harness multiple-choice task: the option whose target is likeliest).  ``letter``: the letters.
    ``explained`` / ``scan``: the solution (which is about the right option ``answer``) with the right option's
    text replaced by each option's; ``None`` when the solution does not name the right option's text exactly once
    (it could not be rewritten for another option without guessing)."""
    _check_format(answer_format)
    if answer_format == "letter":
        return [LETTERS[i] for i in range(len(choices))]
    truth = choices[answer]
    solution = " ".join(str(solution or "").split())
    if solution and solution.count(truth) != 1:
        return None
    return [scienceqa_target(i, solution.replace(truth, c), answer_format, choices) for i, c in enumerate(choices)]


def _read_json(path: Path, what: str) -> dict:
    if not path.is_file():
        raise FileNotFoundError(
            f"ScienceQA {what} not found at {path}. Put the official release there: problems.json and "
            "pid_splits.json from the ScienceQA repository (data/scienceqa) and the images as "
            "images/<split>/<pid>/image.png (see docs/vlm.md)")
    value = load_json(path, f"ScienceQA {what}")
    if not isinstance(value, dict):
        raise DataFileError(f"{path}: expected a JSON object (the official {what}), got a {type(value).__name__}")
    return value


def read_scienceqa(root: str | Path, split: str, answer_format: str = "letter") -> list[VQAExample]:
    """The problems of ``split`` that have an image (ScienceQA-IMG), in ``pid_splits.json`` order, with prompts and
    targets in ``answer_format`` (``letter``, ``explained`` or ``scan``, module docstring)."""
    _check_format(answer_format)
    root = Path(root)
    problems = _read_json(root / "problems.json", "problems.json")
    splits = _read_json(root / "pid_splits.json", "pid_splits.json")
    if split not in splits:
        raise ValueError(f"ScienceQA has no split {split!r} in {root / 'pid_splits.json'}; it has {sorted(splits)}")
    out, skipped = [], 0
    for pid in splits[split]:
        pid = str(pid)
        if pid not in problems:
            raise ValueError(f"pid_splits.json lists problem {pid!r} ({split}), which problems.json lacks")
        p = problems[pid]
        missing = [k for k in _REQUIRED if k not in p]
        if missing:
            raise ValueError(f"ScienceQA problem {pid!r} lacks {missing}")
        if not p.get("image"):
            skipped += 1
            continue
        answer = int(p["answer"])
        if not 0 <= answer < len(p["choices"]):
            raise ValueError(f"ScienceQA problem {pid!r}: answer {answer} outside its {len(p['choices'])} choices")
        image = root / "images" / p.get("split", split) / pid / p["image"]
        if not image.is_file():
            image = root / "images" / split / pid / p["image"]
        if not image.is_file():
            raise FileNotFoundError(f"image of ScienceQA problem {pid!r} not found at {image}")
        choices = [str(c) for c in p["choices"]]
        prompt = scienceqa_prompt(p["question"], choices, p.get("hint", ""), answer_format)
        out.append(VQAExample(qid=pid, image=image, prompt=prompt, task="scienceqa", choices=choices,
                              target=scienceqa_target(answer, p.get("solution", ""), answer_format, choices),
                              answer_index=answer,
                              option_targets=option_targets(choices, answer, p.get("solution", ""), answer_format)
                              or []))
    log.info("ScienceQA %s: %d problems with an image (%d without skipped)", split, len(out), skipped)
    return out


__all__ = ["ANSWER_FORMATS", "INSTRUCTION", "INSTRUCTION_EXPLAINED", "INSTRUCTION_SCAN", "option_targets",
           "read_scienceqa",
           "scienceqa_prompt",
           "scienceqa_target"]
