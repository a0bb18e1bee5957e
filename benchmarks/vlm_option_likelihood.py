"""ScienceQA-layout accuracy by option likelihood (a second metric, lm-eval-harness style) on the labelled test set.

    flock /tmp/svd-vggt-heavy.lock .venv/bin/python benchmarks/vlm_option_likelihood.py \
        --model outputs/vlm/clip_smollm2_explained/version_0/pretrained --scienceqa-format explained \
        --out docs/results/vlm_option_likelihood_explained.json

For every test question and every option, the conditional log-likelihood of the answer the question would have if
that option were right (its training target in ``--scienceqa-format``: the letter, or "The picture shows: <option>.
The answer is <letter>." with its end token; :func:`data.vqa.scienceqa.option_targets`), given the image and the
prompt; the predicted option is the likeliest (summed over the answer's tokens, not length-normalised: an
lm-eval-harness multiple-choice ``acc``).  Nothing is generated or parsed, so this measures what the model
prefers among the options, not whether it writes a parseable answer (the generation metric of the training run's
test).  Chance: 25 %.  Runs in bf16 autocast, as the training runs' tests do (``--fp32`` for float32).
In the explained and scan formats the candidates differ first in the named class, so this score mostly measures
whether the model recognises the image among the options.

``--letter-given-answer`` is a diagnostic, not a metric: the candidates are the *right* target with only its final
letter changed (``... The answer is A.`` / ``B.`` / ...), so it measures whether, with the right explanation
written, the model puts the right letter last: the copy step alone.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch

from data.vqa.common import VQACollator
from data.vqa.datamodule import VQADataModule
from lightning_modules.vlm_spec import VLMSpec
from models.vlm import load_vlm


@torch.no_grad()
def option_likelihood_choices(model, collator: VQACollator, examples: list, batch_size: int = 20) -> list[int]:
    """Index of the likeliest option target of every example (module docstring)."""
    missing = [e.qid for e in examples if len(e.option_targets) != len(e.choices)]
    if missing:
        raise ValueError(f"examples {missing[:3]} carry no option targets (the reader could not write one per "
                         "option); likelihood scoring needs them")
    flat = [replace(e, target=t) for e in examples for t in e.option_targets]
    nll = []
    for i in range(0, len(flat), batch_size):
        batch = collator(flat[i: i + batch_size])
        nll.append(VLMSpec.answer_nll(model, batch)[0])
    nll = torch.cat(nll).tolist()
    out, k = [], 0
    for e in examples:
        scores = nll[k: k + len(e.choices)]
        out.append(min(range(len(scores)), key=scores.__getitem__))
        k += len(e.choices)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a trained save_pretrained folder")
    p.add_argument("--scienceqa-format", choices=["letter", "explained", "scan"], default="letter")
    p.add_argument("--test-samples", type=int, default=100, help="first test questions (half per dataset)")
    p.add_argument("--letter-given-answer", action="store_true",
                   help="diagnostic: candidates differ only in the final letter of the right target (docstring)")
    p.add_argument("--batch-size", type=int, default=20)
    p.add_argument("--fp32", action="store_true", help="float32 instead of bf16 autocast")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", type=Path, default=None, help="JSON output")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    model, processor = load_vlm(args.model)
    model.eval()
    dm = VQADataModule(dataset="scienceqa", root="labelled", processor=processor, test_samples=args.test_samples,
                       scienceqa_format=args.scienceqa_format)
    examples = dm.examples("test")
    if args.letter_given_answer:
        if args.scienceqa_format == "letter":
            raise ValueError("--letter-given-answer needs an explained or scan format (a letter target has no "
                             "explanation before its letter)")
        examples = [replace(e, option_targets=[e.target.rsplit("The answer is ", 1)[0] + f"The answer is {L}."
                                               for L in "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[: len(e.choices)]])
                    for e in examples]
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=not args.fp32):
        picks = option_likelihood_choices(model, VQACollator(processor, "train"), examples, args.batch_size)
    correct = sum(int(k == e.answer_index) for k, e in zip(picks, examples))
    n = len(examples)
    acc = 100.0 * correct / n
    se = 100.0 * math.sqrt(acc / 100 * (1 - acc / 100) / n)
    out = {"command": "flock /tmp/svd-vggt-heavy.lock .venv/bin/python " + " ".join(sys.argv),
           "model": args.model, "scienceqa_format": args.scienceqa_format,
           "candidates": "right target, final letter varied" if args.letter_given_answer else "option targets",
           "n": n, "correct": correct,
           "accuracy": acc, "standard_error": se, "chance": 100.0 / len(examples[0].choices),
           "per_dataset": {name: 100.0 * sum(int(k == e.answer_index) for j, (k, e) in enumerate(zip(picks, examples))
                                             if j % 2 == d) / len(examples[d::2])
                           for d, name in enumerate(("fashion_mnist", "digits"))},
           "precision": "fp32" if args.fp32 else "bf16 autocast", "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=1))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(out, indent=1) + "\n")


if __name__ == "__main__":
    main()
