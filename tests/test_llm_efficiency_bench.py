"""benchmarks/llm_efficiency.py's CPU-checkable parts: the 1.1B model it builds from a config for the GPU run,
and its peak-memory table (filled on CUDA only)."""

from __future__ import annotations

import importlib
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its sibling ``common``
    monkeypatch.setenv("SVD_VGGT_OMP_WAIT", "default")  # what the import sets, undone after the test
    monkeypatch.delitem(sys.modules, "benchmarks.llm_efficiency", raising=False)
    return importlib.import_module("benchmarks.llm_efficiency")


def test_config_llama_1b_has_tinyllama_shapes(bench):
    model = bench.load("llama-1b", "meta", torch.bfloat16)  # shapes only: nothing is allocated
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape) == ((2048, 2048), (256, 2048))
    assert len(model.model.layers) == 22 and model.lm_head.weight is not model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.bfloat16


def test_config_smollm2_has_the_real_models_shapes(bench):
    from models.causal_lm import load_causal_lm

    built, real = bench.load("smollm2-135m-config", "meta", torch.float32), load_causal_lm("smollm2-135m")[0]
    assert [(n, p.shape) for n, p in built.named_parameters()] == [(n, p.shape) for n, p in real.named_parameters()]
    assert sum(p.numel() for p in built.parameters()) == 134_515_008
    assert built.lm_head.weight is built.model.embed_tokens.weight  # tied, as the real one


def test_peak_memory_table_has_one_row_per_model(bench):
    mib = 2**20
    peaks = {("prefill", "dense"): 300 * mib, ("decode", "dense"): 280 * mib,
             ("prefill", "0.4 prefill"): 200 * mib, ("decode", "0.4 decode"): 150 * mib,
             ("prefill", "0.4 prefill compiled"): 190 * mib}
    lines = bench.memory_table(peaks).splitlines()
    assert lines[1] == "## Peak GPU memory"
    assert lines[-3:] == ["| dense | 300 | 280 |", "| 0.4 optimized | 200 | 150 |",
                          "| 0.4 optimized compiled | 190 | - |"]
    assert bench.memory_table({}) == ""  # CPU runs: no section
