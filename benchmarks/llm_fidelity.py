"""Fidelity of compressed causal LMs to the dense model: per-token KL(dense || compressed) and top-1 agreement.

    python benchmarks/llm_fidelity.py --ckpt distilled=outputs/llm/best/version_0/compressed.ckpt --out fidelity.md

Perplexity over the dense model's can fall below 1 when recovery trains on raw text (the model then moves
towards the finetuning corpora, away from the model it compresses); this measures how far each compressed
model's next-token distribution is from the dense model's on held-out windows (``data.domains.DOMAIN_TESTS``
plus any ``--extra NAME=SOURCE``). Each ``--ckpt NAME=PATH`` is a ``compressed.ckpt`` written by ``train.py``
for the same base model: its plan is applied to a copy of the dense model and its weights loaded
(:func:`compression.io.safe_torch_load`: tensors only, nothing is unpickled).
"""

from __future__ import annotations

import copy
import json
import shlex
import sys

import common  # noqa: F401 -- before torch: passive OpenMP waiting, the repository on sys.path
import torch

from compression import apply_plan
from compression.io import safe_torch_load
from data.domains import DOMAIN_TESTS
from data.text import TextDataModule
from lightning_modules.module import PLAN_KEY
from models.causal_lm import load_causal_lm


def _pairs(specs: list[str], what: str) -> dict[str, str]:
    out = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        if not sep or not name or not value:
            raise SystemExit(f"{what} {spec!r}: expected NAME=VALUE")
        out[name] = value
    return out


def load_student(dense: torch.nn.Module, path: str) -> torch.nn.Module:
    checkpoint = safe_torch_load(path)  # tensors and plain containers only: nothing is unpickled
    if PLAN_KEY not in checkpoint:
        raise SystemExit(f"--ckpt {path}: no compression plan in it; pass a compressed.ckpt written by train.py")
    model = copy.deepcopy(dense)
    apply_plan(model, checkpoint[PLAN_KEY])
    state = {k.removeprefix("model."): v for k, v in checkpoint["state_dict"].items() if k.startswith("model.")}
    model.load_state_dict(state, strict=True)
    return model.eval()


@torch.no_grad()
def fidelity(dense, students: dict, windows: torch.Tensor, batch: int = 4) -> dict[str, dict[str, float]]:
    sums = {name: [0.0, 0, 0] for name in students}  # KL sum, top-1 matches, tokens
    for chunk in windows.split(batch):
        logp = torch.log_softmax(dense(input_ids=chunk).logits.float(), -1)
        for name, model in students.items():
            logq = torch.log_softmax(model(input_ids=chunk).logits.float(), -1)
            kl = (logp.exp() * (logp - logq)).sum(-1)
            if not torch.isfinite(kl).all():
                raise FloatingPointError(f"{name}: non-finite KL to the dense model")
            sums[name][0] += kl.sum().item()
            sums[name][1] += (logp.argmax(-1) == logq.argmax(-1)).sum().item()
            sums[name][2] += kl.numel()
    return {name: {"kl": s[0] / s[2], "top1": s[1] / s[2]} for name, s in sums.items()}


def main() -> None:
    p = common.lm_parser(__doc__, eval_tokens=4096)
    p.add_argument("--ckpt", nargs="+", required=True, help="NAME=PATH of train.py's compressed.ckpt files")
    p.add_argument("--extra", nargs="*", default=[], help="NAME=SOURCE held-out corpora besides DOMAIN_TESTS")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    dense, tokenizer = load_causal_lm(args.model)
    dense.eval()
    domains = {**DOMAIN_TESTS, **_pairs(args.extra, "--extra")}
    students = {name: load_student(dense, path) for name, path in _pairs(args.ckpt, "--ckpt").items()}
    data = TextDataModule(tokenizer=tokenizer, seq_len=args.seq_len, calibration_samples=1, test=domains,
                          eval_max_tokens=args.eval_tokens)
    results = {domain: fidelity(dense, students, data.eval_windows(source)) for domain, source in domains.items()}
    names = list(students)
    command = "python benchmarks/llm_fidelity.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
    lines = [f"# Fidelity to the dense model ({args.model})", "", f"Command: `{command}`", "",
             "Per-token KL(dense || compressed) in nats (lower is closer) and the fraction of positions where the "
             f"two models' most likely next token agree; {args.eval_tokens} tokens per corpus in {args.seq_len}-token "
             "windows.", "",
             "| corpus | " + " | ".join(f"{n} KL | {n} top-1" for n in names) + " |",
             "|---|" + "---:|---:|" * len(names)]
    for domain, row in results.items():
        lines.append(f"| {domain} ({domains[domain]}) | "
                     + " | ".join(f"{row[n]['kl']:.3f} | {row[n]['top1']:.3f}" for n in names) + " |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        common.write_keeping_notes(args.out, text)
        args.out.with_suffix(".json").write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
