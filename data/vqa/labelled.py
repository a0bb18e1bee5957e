"""Real labelled images written as ScienceQA and VizWiz sets (official on-disk layouts), from real labels.

Sources: Fashion-MNIST (10 clothing classes, 28 px) and OpenCV's ``digits.png`` (10 digits, 20 px),
read by :mod:`data.images`.  The questions and answers are written by this module from each image's
label, so the readers of :mod:`data.vqa.scienceqa` / :mod:`data.vqa.vizwiz` and everything after them run
unchanged on real pixels:

- **ScienceQA layout** (multiple choice, chance 25 %): ``Which piece of clothing is shown in the
  picture?`` / ``Which digit is written in the picture?`` with four options -- the true class and three
  other classes of the same dataset, drawn with the seed, the true one at a uniform position;
- **VizWiz layout** (open short answers, chance 10 % for a uniform guess among a dataset's classes):
  ``What piece of clothing is this?`` / ``What digit is written here?``; the ten "annotator" answers are
  all the label's class name (one annotator: the dataset's label).

Splits: per dataset, one seeded permutation of its pool; **train** and **val** images come from it
(Fashion-MNIST: its ``train`` file), **test** images from Fashion-MNIST's own ``t10k`` file and, for the
digits (one pool), from the rest of the permutation.  No image is in two splits.  Within a split the
two datasets alternate (fashion, digit, fashion, ...), so every prefix (``test_samples: n``) is balanced.
Both layouts of one ``seed`` use the same images per split.  Every problem / record also carries
``source`` (``fashion_mnist/t10k/1234``, ``digits/0/4321``: dataset, file, index) for auditing.

:func:`labelled_root` writes a set once into the cache (atomically) and returns its folder;
``VQADataModule(root="labelled")`` reads it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
from PIL import Image

from models.assets import atomic_directory, cache_root

FASHION_CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag",
                   "ankle boot")
DIGIT_CLASSES = tuple(str(d) for d in range(10))
SOURCES = {
    "fashion_mnist": {"classes": FASHION_CLASSES, "mc": "Which piece of clothing is shown in the picture?",
                      "open": "What piece of clothing is this?", "type": "other"},
    "digits": {"classes": DIGIT_CLASSES, "mc": "Which digit is written in the picture?",
               "open": "What digit is written here?", "type": "number"},
}
SIZES = {"train": 1000, "val": 50, "test": 100}  # images per dataset and split
OPTIONS = 4
VERSION = 1  # bump when the generated content changes (the cache folder is keyed by it)
LAYOUTS = ("scienceqa", "vizwiz")

__all__ = ["FASHION_CLASSES", "LAYOUTS", "labelled_images", "labelled_root", "write_labelled"]


def labelled_images(sizes: dict[str, int] | None = None, seed: int = 0, fashion_root: str | None = None,
                    digits_path: str | None = None) -> dict[str, list[tuple[str, np.ndarray, int, str]]]:
    """``split -> [(dataset, image uint8 [h, w], label, source)]``, the datasets alternating (module docstring)."""
    from data.images import load_digits, load_fashion_mnist

    sizes = dict(sizes or SIZES)
    if set(sizes) != {"train", "val", "test"} or min(sizes.values()) < 1:
        raise ValueError(f"sizes needs train, val and test counts >= 1, got {sizes}")
    per_dataset: dict[str, dict[str, list]] = {}
    for i, name in enumerate(SOURCES):
        rng = np.random.default_rng([seed, i])
        if name == "fashion_mnist":
            x, y = load_fashion_mnist("train", fashion_root)
            tx, ty = load_fashion_mnist("test", fashion_root)
            order, test_order = rng.permutation(len(x)), rng.permutation(len(tx))
            picks = {"train": ("train", x, y, order[: sizes["train"]]),
                     "val": ("train", x, y, order[sizes["train"]: sizes["train"] + sizes["val"]]),
                     "test": ("t10k", tx, ty, test_order[: sizes["test"]])}
        else:
            x, y = load_digits(digits_path)
            if sum(sizes.values()) > len(x):
                raise ValueError(f"digits: the splits {sizes} need {sum(sizes.values())} images, the pool has {len(x)}")
            order = rng.permutation(len(x))
            bounds = np.cumsum([0, sizes["train"], sizes["val"], sizes["test"]])
            picks = {s: ("0", x, y, order[bounds[k]: bounds[k + 1]]) for k, s in enumerate(("train", "val", "test"))}
        per_dataset[name] = {s: [(name, xs[j], int(ys[j]), f"{name}/{file}/{int(j)}") for j in idx]
                             for s, (file, xs, ys, idx) in picks.items()}
    out = {}
    for split in ("train", "val", "test"):
        columns = [per_dataset[n][split] for n in SOURCES]
        out[split] = [item for row in zip(*columns) for item in row]
    return out


def _problem(rng: random.Random, name: str, label: int, split: str, source: str) -> dict:
    classes = SOURCES[name]["classes"]
    truth = classes[label]
    options = [truth] + rng.sample([c for c in classes if c != truth], OPTIONS - 1)
    rng.shuffle(options)
    return {"question": SOURCES[name]["mc"], "choices": options, "answer": options.index(truth), "hint": "",
            "image": "image.png", "split": split, "task": "closed choice", "grade": "", "subject": "vision",
            "topic": name, "category": f"Identify the {'digit' if name == 'digits' else 'clothing'}",
            "skill": name, "lecture": "", "solution": f"The picture shows: {truth}.", "source": source}


def write_labelled(root: str | Path, layout: str, sizes: dict[str, int] | None = None, seed: int = 0,
                   fashion_root: str | None = None, digits_path: str | None = None) -> Path:
    """Write the ``layout`` (``scienceqa`` / ``vizwiz``) set of the module docstring under ``root``."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    root = Path(root)
    images = labelled_images(sizes, seed, fashion_root, digits_path)
    rng = random.Random(seed)
    if layout == "scienceqa":
        problems, splits, pid = {}, {}, 1
        for split, items in images.items():
            splits[split] = []
            for name, pixels, label, source in items:
                key = str(pid)
                pid += 1
                splits[split].append(key)
                problems[key] = _problem(rng, name, label, split, source)
                folder = root / "images" / split / key
                folder.mkdir(parents=True, exist_ok=True)
                Image.fromarray(pixels).save(folder / "image.png")
        (root / "problems.json").write_text(json.dumps(problems, indent=0))
        (root / "pid_splits.json").write_text(json.dumps(splits))
        return root
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, items in images.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        records = []
        for i, (name, pixels, label, source) in enumerate(items):
            image = f"VizWiz_{split}_{i:08d}.png"
            Image.fromarray(pixels).save(root / split / image)
            truth = SOURCES[name]["classes"][label]
            records.append({"image": image, "question": SOURCES[name]["open"],
                            "answers": [{"answer": truth, "answer_confidence": "yes"}] * 10, "answerable": 1,
                            "answer_type": SOURCES[name]["type"], "source": source})
        (root / "annotations" / f"{split}.json").write_text(json.dumps(records, indent=0))
    return root


def labelled_root(layout: str, seed: int = 0, cache_dir: str | Path | None = None) -> Path:
    """The folder of the ``layout`` set for ``seed`` (default sizes :data:`SIZES`), written on first use."""
    if layout not in LAYOUTS:
        raise ValueError(f"no labelled set for {layout!r}; choose one of {LAYOUTS}")
    base = Path(cache_dir) if cache_dir is not None else cache_root() / "vqa-labelled"
    target = base / f"{layout}-v{VERSION}-seed{seed}"
    if not target.is_dir():
        with atomic_directory(target) as tmp:
            write_labelled(tmp, layout, seed=seed)
    return target
