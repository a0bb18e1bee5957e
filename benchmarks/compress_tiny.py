"""Compress a tiny random-init GQA LLaMA with every method and print the reports.

    python benchmarks/compress_tiny.py [--ratio 0.3]

Random weights carry no knowledge, so this shows the mechanics (ranks, real parameter
counts, per-layer truncation loss) and the relative logit error of each method on held-out
tokens drawn like the calibration tokens -- not language-model quality.
"""

from __future__ import annotations

import os

# before torch loads OpenMP: spinning worker threads starve on a shared CPU (see the Makefile)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import logging
import time

import torch  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM

from compression import Recipe, collect_stats, compress_, eligible_linears


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ratio", type=float, default=0.3, help="fraction of targeted parameters removed")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 512, (4, 64), generator=g)} for _ in range(8)]
    held_out = {"input_ids": torch.randint(0, 512, (4, 64), generator=g)}
    dense = tiny_llama(0)
    with torch.no_grad():
        ref = dense(**held_out).logits
    stats = collect_stats(dense, list(eligible_linears(dense)[0]), calib)
    print(f"dense parameters: {sum(p.numel() for p in dense.parameters()):,}")
    for method in ("svd", "asvd", "svd_llm", "svd_llm_v2"):
        for allocation in ("uniform", "v2"):
            model = tiny_llama(0)
            t0 = time.perf_counter()
            report = compress_(model, Recipe(method, ratio=args.ratio, allocation=allocation), stats)
            with torch.no_grad():
                out = model(**held_out).logits
            rel = float((out - ref).norm() / ref.norm())
            print(f"{method:>11} / {allocation:<7}  params {report.model_params_after:>9,}  removed "
                  f"{report.params_ratio:.3f} of targeted  held-out logit rel. error {rel:.4f}  "
                  f"({time.perf_counter() - t0:.2f} s)")
    print()
    print(report.to_table(max_rows=8))


if __name__ == "__main__":
    main()
