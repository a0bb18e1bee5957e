"""VizWiz-VQA in its official format as :class:`VQAExample`.

Layout under ``root`` (the VizWiz release)::

    annotations/train.json   [{"image": "VizWiz_train_00000000.jpg", "question": "...",
                               "answers": [{"answer": "...", "answer_confidence": "yes|maybe|no"} x 10],
                               "answerable": 0 | 1, "answer_type": "other|yes/no|number|unanswerable"}, ...]
    annotations/val.json     (same)
    annotations/test.json    (no answers: scored only by the evaluation server)
    train/VizWiz_train_*.jpg   val/VizWiz_val_*.jpg   test/VizWiz_test_*.jpg

Questions the annotators could not answer from the photo have ``answerable: 0`` and answers
(mostly) ``unanswerable``; they stay in the set, as in the benchmark.  The user text is LLaVA-1.5's
VizWiz prompt::

    <question>
    When the provided information is insufficient, respond with 'Unanswerable'.
    Answer the question using a single word or phrase.

The training target is the most frequent normalised answer (ties: the first given); scoring is
the soft VQA accuracy over the ten answers (:mod:`metrics.vqa`).  The test split has no answers,
so local evaluation uses ``val`` (the paper tables' test-dev numbers come from the server).
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

from data.jsonfiles import load_json
from data.vqa.common import VQAExample
from metrics.vqa import vqa_normalize

log = logging.getLogger(__name__)

UNANSWERABLE_HINT = "When the provided information is insufficient, respond with 'Unanswerable'."
SHORT_ANSWER = "Answer the question using a single word or phrase."


def vizwiz_prompt(question: str) -> str:
    return f"{question.strip()}\n{UNANSWERABLE_HINT}\n{SHORT_ANSWER}"


def majority_answer(answers: list[str]) -> str:
    """The most frequent normalised answer; ties go to the one given first."""
    normalised = [vqa_normalize(a) for a in answers]
    counts = Counter(n for n in normalised if n)
    if not counts:
        return "unanswerable"
    best = max(counts.values())
    return next(n for n in normalised if counts.get(n) == best)


def read_vizwiz(root: str | Path, split: str) -> list[VQAExample]:
    """The questions of ``split`` (``train``/``val``) with their ten answers."""
    root = Path(root)
    path = root / "annotations" / f"{split}.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"VizWiz annotations not found at {path}. Put the VizWiz-VQA release there: annotations/{{train,val}}.json "
            "and the images under train/ and val/ (see docs/vlm.md)")
    records = load_json(path, "VizWiz annotations JSON")
    if not isinstance(records, list):
        raise ValueError(f"{path}: expected a JSON list of question records")
    out = []
    for i, r in enumerate(records):
        if "image" not in r or "question" not in r:
            raise ValueError(f"{path} record {i} lacks 'image' or 'question'")
        answers = [a["answer"] if isinstance(a, dict) else str(a) for a in r.get("answers", [])]
        if not answers:
            raise ValueError(f"{path}: record {i} ({r['image']}) has no answers; the {split!r} split cannot be scored "
                             "locally (VizWiz test answers are held by the evaluation server: evaluate on 'val')")
        image = root / split / r["image"]
        if not image.is_file():
            raise FileNotFoundError(f"VizWiz image {image} (record {i} of {path}) not found")
        out.append(VQAExample(qid=Path(r["image"]).stem, image=image, prompt=vizwiz_prompt(r["question"]),
                              target=majority_answer(answers), task="vizwiz", answers=answers))
    unanswerable = sum(1 for r in records if r.get("answerable", 1) == 0)
    log.info("VizWiz %s: %d questions (%d marked unanswerable)", split, len(out), unanswerable)
    return out


__all__ = ["majority_answer", "read_vizwiz", "vizwiz_prompt"]
