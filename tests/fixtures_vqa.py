"""Tiny hand-written ScienceQA and VizWiz fixtures in exactly the official on-disk formats.

ScienceQA (``problems.json`` / ``pid_splits.json`` / ``images/<split>/<pid>/image.png``)::

    pid  split  image  choices                         answer  hint
    1    train  yes    red, blue                       1       "Look at the picture."
    2    train  yes    cat, black cat, dog             1       ""
    3    train  no     (text-only: not in the image subset)
    4    val    yes    square, circle                  0       ""
    5    test   yes    red, green, blue                2       "One object."
    6    test   yes    yes, no                         0       ""
    7    test   no     (text-only)

VizWiz (``annotations/{train,val,test}.json`` / ``{split}/VizWiz_{split}_XXXXXXXX.jpg``): three
train questions (the last unanswerable), two val questions, one test question without answers.
"""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

SCIENCEQA = {
    "1": ("train", True, "Which colour is the square?", ["red", "blue"], 1, "Look at the picture."),
    "2": ("train", True, "Which animal is shown?", ["cat", "black cat", "dog"], 1, ""),
    "3": ("train", False, "Which word is a colour?", ["red", "chair"], 0, ""),
    "4": ("val", True, "Which shape is shown?", ["square", "circle"], 0, ""),
    "5": ("test", True, "Which colour is the object?", ["red", "green", "blue"], 2, "One object."),
    "6": ("test", True, "Is there an object?", ["yes", "no"], 0, ""),
    "7": ("test", False, "Which is a number?", ["seven", "tree"], 0, ""),
}
SPLITS = {"train": ["1", "2", "3"], "val": ["4"], "test": ["5", "6", "7"], "minitest": ["5"]}

VIZWIZ = {
    "train": [("What colour is this?", ["red"] * 6 + ["Red."] * 2 + ["dark red", "unanswerable"], 1),
              ("What is this?", ["a cup"] * 4 + ["cup"] * 3 + ["mug"] * 3, 1),
              ("What does it say?", ["unanswerable"] * 8 + ["milk", "unsuitable"], 0)],
    "val": [("How many coins?", ["two"] * 5 + ["2"] * 3 + ["3", "unanswerable"], 1),
            ("What colour is the shirt?", ["blue"] * 2 + ["navy"] * 7 + ["unanswerable"], 1)],
}


def _image(color: tuple[int, int, int], size: int = 40) -> Image.Image:
    img = Image.new("RGB", (size, size), (250, 250, 250))
    img.paste(color, (8, 8, size - 8, size - 8))
    return img


def write_scienceqa_fixture(root: Path) -> Path:
    problems = {}
    for pid, (split, has_image, question, choices, answer, hint) in SCIENCEQA.items():
        problems[pid] = {"question": question, "choices": choices, "answer": answer, "hint": hint,
                         "image": "image.png" if has_image else None, "task": "closed choice", "grade": "grade3",
                         "subject": "natural science", "topic": "colors", "category": "Colours", "skill": "colours",
                         "lecture": "", "solution": "", "split": split}
        if has_image:
            folder = root / "images" / split / pid
            folder.mkdir(parents=True, exist_ok=True)
            _image((40 * int(pid), 80, 160)).save(folder / "image.png")
    root.mkdir(parents=True, exist_ok=True)
    (root / "problems.json").write_text(json.dumps(problems))
    (root / "pid_splits.json").write_text(json.dumps(SPLITS))
    return root


def write_vizwiz_fixture(root: Path) -> Path:
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, rows in {**VIZWIZ, "test": [("What is this?", [], 1)]}.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i, (question, answers, answerable) in enumerate(rows):
            name = f"VizWiz_{split}_{i:08d}.jpg"
            _image((30 * i, 120, 200)).save(root / split / name, quality=90)
            record = {"image": name, "question": question}
            if answers:
                record.update(answers=[{"answer": a, "answer_confidence": "yes"} for a in answers],
                              answerable=answerable, answer_type="other" if answerable else "unanswerable")
            records.append(record)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(records))
    return root
