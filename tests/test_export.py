"""save_compressed / load_compressed: bit-exact round trips, tied weights, dense export, atomicity."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from compression import LowRankLinear, Recipe, collect_stats, compress_, eligible_linears
from compression.export import PLAN_NAME, WEIGHTS_NAME, load_compressed, read_export_info, save_compressed
from tests.conftest import make_tiny_llama
from tests.test_llm_data import byte_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


def compressed_llama(batches, tie=True, ratio=0.3):
    model = make_tiny_llama(tie=tie)
    names = [n for n in eligible_linears(model)[0] if n != "lm_head"]
    stats = collect_stats(model, names, batches)
    report = compress_(model, Recipe(method="svd_llm", ratio=ratio, targets=names), stats)
    return model, report.plan


def logits(model, batch):
    with torch.no_grad():
        return model(**batch).logits


@pytest.mark.parametrize("tie", [True, False])
def test_round_trip_is_bit_exact(tmp_path, token_batches, tie):
    model, plan = compressed_llama(token_batches, tie=tie)
    out = save_compressed(model, tmp_path / "export", plan, tokenizer=byte_tokenizer())
    assert {WEIGHTS_NAME, PLAN_NAME, "config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert json.loads((out / PLAN_NAME).read_text()) == json.loads(json.dumps(plan))
    assert read_export_info(out)["compressed"] == "true"
    with safe_open(out / WEIGHTS_NAME, framework="pt") as f:
        keys = set(f.keys())
    # a tied head is stored once; the factors are stored under their own names
    assert ("lm_head.weight" in keys) + ("model.embed_tokens.weight" in keys) == (1 if tie else 2)
    assert "model.layers.0.self_attn.q_proj.down.weight" in keys

    loaded, tokenizer = load_compressed(out)
    assert tokenizer is not None and tokenizer.eos_token == "<eos>"
    assert sum(isinstance(m, LowRankLinear) for m in loaded.modules()) == 14
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == tie
    for name, module in loaded.named_modules():
        if isinstance(module, LowRankLinear):
            assert module.rank == plan["layers"][name]["rank"]
    for batch in token_batches:
        assert torch.equal(logits(loaded, batch), logits(model, batch))
    ref, got = model.state_dict(), loaded.state_dict()
    assert ref.keys() == got.keys()
    assert all(torch.equal(ref[k], got[k]) for k in ref)


def test_load_with_dtype_casts(tmp_path, token_batches):
    model, plan = compressed_llama(token_batches)
    save_compressed(model, tmp_path / "e", plan)
    loaded, tokenizer = load_compressed(tmp_path / "e", dtype=torch.float64)
    assert tokenizer is None
    assert loaded.model.layers[0].self_attn.q_proj.down.weight.dtype == torch.float64
    torch.testing.assert_close(logits(loaded, token_batches[0]).float(), logits(model, token_batches[0]),
                               rtol=1e-4, atol=1e-5)


def test_merge_to_dense_loads_as_plain_model(tmp_path, token_batches):
    from transformers import AutoModelForCausalLM

    model, plan = compressed_llama(token_batches)
    out = save_compressed(model, tmp_path / "dense", plan, merge_to_dense=True)
    assert not (out / PLAN_NAME).exists()
    assert isinstance(model.model.layers[0].self_attn.q_proj, LowRankLinear)  # merged on a copy only
    dense = AutoModelForCausalLM.from_pretrained(out).eval()
    assert not any(isinstance(m, LowRankLinear) for m in dense.modules())
    assert dense.model.layers[0].self_attn.q_proj.weight.shape == (64, 64)
    for batch in token_batches:
        diff = (logits(dense, batch) - logits(model, batch)).abs().max().item()
        assert diff < 1e-5


def test_export_is_atomic_and_refuses_to_clobber(tmp_path, token_batches, monkeypatch):
    model, plan = compressed_llama(token_batches)
    target = tmp_path / "export"
    save_compressed(model, target, plan)
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_compressed(model, target, plan)

    import compression.export as export

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(export, "save_plan", boom)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, tmp_path / "second", plan)
    with pytest.raises(OSError, match="disk full"):
        save_compressed(model, target, plan, overwrite=True)
    # no half folder under the new name, no temporary folders left, the old export intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    loaded, _ = load_compressed(target)
    assert torch.equal(logits(loaded, token_batches[0]), logits(model, token_batches[0]))


def test_mismatched_plan_is_explained(tmp_path, token_batches):
    model, plan = compressed_llama(token_batches)
    out = save_compressed(model, tmp_path / "e", plan)
    other = json.loads((out / PLAN_NAME).read_text())
    name = "model.layers.0.self_attn.q_proj"
    other["layers"][name]["rank"] += 1
    (out / PLAN_NAME).write_text(json.dumps(other))
    with pytest.raises(RuntimeError, match="does not match the rebuilt model"):
        load_compressed(out)
    with pytest.raises(FileNotFoundError, match="save_compressed"):
        load_compressed(tmp_path)


def test_adapters_must_be_merged_before_export(tmp_path, token_batches):
    from peft import LoraConfig, inject_adapter_in_model

    model, plan = compressed_llama(token_batches)
    inject_adapter_in_model(LoraConfig(r=2, target_modules=["model.layers.0.self_attn.q_proj.down"]), model)
    with pytest.raises(ValueError, match="LoRA adapters"):
        save_compressed(model, tmp_path / "e", plan)
    assert not (tmp_path / "e").exists()
