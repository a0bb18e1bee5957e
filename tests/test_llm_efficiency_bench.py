"""benchmarks/llm_efficiency.py's CPU-checkable parts: the 1.1B model it builds from a config for the GPU run,
and its peak-memory table (filled on CUDA only)."""

from __future__ import annotations

import copy
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
    model = bench.common.load_lm("llama-1b", "meta", torch.bfloat16)  # shapes only: nothing is allocated
    assert sum(p.numel() for p in model.parameters()) == 1_100_048_384
    attn = model.model.layers[0].self_attn
    assert (attn.q_proj.weight.shape, attn.k_proj.weight.shape) == ((2048, 2048), (256, 2048))
    assert len(model.model.layers) == 22 and model.lm_head.weight is not model.model.embed_tokens.weight
    assert next(model.parameters()).dtype == torch.bfloat16


def test_config_smollm2_has_the_real_models_shapes(bench):
    from models.causal_lm import load_causal_lm

    built, real = bench.common.load_lm("smollm2-135m-config", "meta", torch.float32), load_causal_lm("smollm2-135m")[0]
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


def test_truncated_copy_is_what_compress_gives_at_the_higher_ratio(bench):
    from compression import LowRankLinear, Recipe, compress_
    from lightning_modules.specs import CausalLMSpec

    dense = bench.common.load_lm("tiny", "cpu", torch.float64)
    targets = CausalLMSpec(model=dense).default_targets(dense)
    low, high = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_(low, Recipe("svd", ratio=0.2, targets=targets))
    compress_(high, Recipe("svd", ratio=0.6, targets=targets))
    before = {k: v.clone() for k, v in low.state_dict().items()}
    cut = bench.truncated(low, 0.6)
    want = {n: m for n, m in high.named_modules() if isinstance(m, LowRankLinear)}
    got = {n: m for n, m in cut.named_modules() if isinstance(m, LowRankLinear)}
    assert len(want) == len(targets) and got.keys() == want.keys()
    for name, layer in want.items():
        assert got[name].rank == layer.rank < next(m for n, m in low.named_modules() if n == name).rank
        torch.testing.assert_close(got[name].up.weight, layer.up.weight, rtol=0, atol=1e-12)
        torch.testing.assert_close(got[name].down.weight, layer.down.weight, rtol=0, atol=1e-12)
    ids = torch.randint(0, 512, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(cut(input_ids=ids).logits, high(input_ids=ids).logits, rtol=0, atol=1e-10)
    assert all(torch.equal(v, before[k]) for k, v in low.state_dict().items())  # the source is untouched
    with pytest.raises(ValueError, match="exceeds the factors' rank"):
        bench.truncated(cut, 0.2)
