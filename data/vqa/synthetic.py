"""Small synthetic ScienceQA and VizWiz sets written in exactly the official on-disk formats.

No ScienceQA or VizWiz data is available offline, so the readers, DataModules, tests and the
tiny CPU configs run on these: each image is a coloured square, disc or triangle on a plain
background (PNG for ScienceQA, JPEG for VizWiz), drawn with PIL from a seeded generator, and
the questions ask for its colour or shape, so the answers are determined by the pixels.

ScienceQA: per split, ``problems.json`` entries with every field of the release (``question``,
``choices`` (2-4), ``answer``, ``hint`` (empty for about half), ``image``, ``split``, ``task``,
``grade``, ``subject``, ``topic``, ``category``, ``skill``, ``lecture``, ``solution``) plus one
text-only problem (``image: null``) per split, which the image subset must skip.

VizWiz: per split, ten answers per question from simulated annotators who mostly agree but
vary the form (``Red``, ``red.``, ``the red``, ``dark red``), with ``answer_confidence``; one
question in five shows a near-black, blurred photo with ``answerable: 0`` and mostly
``unanswerable`` answers.  ``annotations/test.json`` carries questions without answers, as
the real test split does.

:func:`synthetic_root` writes a set once into the cache (atomically) and returns its folder.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

from models.assets import atomic_directory, cache_root

COLORS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220), "yellow": (235, 210, 40),
          "purple": (140, 50, 170), "orange": (240, 140, 20)}
SHAPES = ("square", "circle", "triangle")
VERSION = 1  # bump when the generated content changes (the cache folder is keyed by it)


def draw_shape(rng: random.Random, color: str, shape: str, size: int = 48) -> Image.Image:
    """A ``size x size`` RGB image of one ``shape`` in ``color`` on a light random background."""
    bg = tuple(rng.randint(200, 255) for _ in range(3))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    r = rng.randint(size // 4, size // 3)
    cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
    box = (cx - r, cy - r, cx + r, cy + r)
    if shape == "square":
        draw.rectangle(box, fill=COLORS[color])
    elif shape == "circle":
        draw.ellipse(box, fill=COLORS[color])
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLORS[color])
    return img


def write_scienceqa(root: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``problems.json``, ``pid_splits.json`` and ``images/<split>/<pid>/image.png`` under ``root``."""
    root = Path(root)
    sizes = sizes or {"train": 24, "val": 6, "test": 8}
    rng = random.Random(seed)
    problems: dict[str, dict] = {}
    splits: dict[str, list[str]] = {}
    pid = 1
    for split, n in sizes.items():
        splits[split] = []
        for i in range(n + 1):
            key = str(pid)
            pid += 1
            splits[split].append(key)
            base = {"task": "closed choice", "grade": f"grade{rng.randint(1, 12)}", "subject": "natural science",
                    "topic": "colors-and-shapes", "category": "Identify colors and shapes", "skill": "Identify shapes",
                    "lecture": "Objects have a colour and a shape.", "split": split}
            if i == n:  # one text-only problem per split: not part of the image subset
                problems[key] = {**base, "question": "Which word is a colour?", "choices": ["red", "chair"],
                                 "answer": 0, "hint": "", "image": None, "solution": "Red is a colour."}
                continue
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            asks_color = rng.random() < 0.5
            pool, truth = (list(COLORS), color) if asks_color else (list(SHAPES), shape)
            options = [truth] + rng.sample([p for p in pool if p != truth], rng.randint(1, min(3, len(pool) - 1)))
            rng.shuffle(options)
            question = f"Which {'colour' if asks_color else 'shape'} is the object in the picture?"
            hint = "The picture shows one object on a plain background." if rng.random() < 0.5 else ""
            problems[key] = {**base, "question": question, "choices": options, "answer": options.index(truth),
                             "hint": hint, "image": "image.png", "solution": f"The object is a {color} {shape}."}
            folder = root / "images" / split / key
            folder.mkdir(parents=True, exist_ok=True)
            draw_shape(rng, color, shape).save(folder / "image.png")
    (root / "problems.json").write_text(json.dumps(problems, indent=1))
    (root / "pid_splits.json").write_text(json.dumps(splits, indent=1))
    return root


def _annotator_answers(rng: random.Random, truth: str, answerable: bool) -> list[dict]:
    variants = [truth, truth.capitalize(), f"{truth}.", f"the {truth}", f"It is {truth}"]
    out = []
    for _ in range(10):
        if not answerable:
            answer = "unanswerable" if rng.random() < 0.8 else truth
        else:
            u = rng.random()
            answer = rng.choice(variants) if u < 0.8 else (f"dark {truth}" if u < 0.9 else "unanswerable")
        out.append({"answer": answer, "answer_confidence": rng.choice(["yes", "yes", "maybe", "no"])})
    return out


def write_vizwiz(root: str | Path, sizes: dict[str, int] | None = None, seed: int = 0) -> Path:
    """Write ``annotations/{split}.json`` and ``{split}/VizWiz_{split}_XXXXXXXX.jpg`` under ``root``."""
    root = Path(root)
    sizes = sizes or {"train": 24, "val": 8, "test": 4}
    rng = random.Random(seed + 1)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i in range(n):
            name = f"VizWiz_{split}_{i:08d}.jpg"
            color, shape = rng.choice(list(COLORS)), rng.choice(SHAPES)
            answerable = rng.random() >= 0.2
            img = draw_shape(rng, color, shape)
            if not answerable:  # a dark, blurred photo: the annotators cannot tell
                img = Image.eval(img.filter(ImageFilter.GaussianBlur(6)), lambda v: v // 12)
            img.save(root / split / name, quality=90)
            asks_color = rng.random() < 0.6
            record = {"image": name, "question": "What colour is this?" if asks_color else "What shape is this?"}
            if split != "test":
                truth = color if asks_color else shape
                record.update(answers=_annotator_answers(rng, truth, answerable), answerable=int(answerable),
                              answer_type="other" if answerable else "unanswerable")
            records.append(record)
        (root / "annotations" / f"{split}.json").write_text(json.dumps(records, indent=1))
    return root


def synthetic_root(dataset: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The folder of the synthetic ``dataset`` (``scienceqa`` / ``vizwiz``) for ``seed``, written once."""
    writers = {"scienceqa": write_scienceqa, "vizwiz": write_vizwiz}
    if dataset not in writers:
        raise ValueError(f"no synthetic set for {dataset!r}; choose one of {sorted(writers)}")
    target = Path(cache_dir) if cache_dir is not None else cache_root() / "vqa-synthetic"
    target = target / f"{dataset}-v{VERSION}-seed{seed}"
    if not target.is_dir():
        with atomic_directory(target) as tmp:
            writers[dataset](tmp, seed=seed)
    return target


__all__ = ["draw_shape", "synthetic_root", "write_scienceqa", "write_vizwiz"]
