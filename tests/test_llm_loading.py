"""Causal-LM loading: local folders round-trip, offline errors explain themselves (SmolLM2: test_causal_lm)."""

from __future__ import annotations

import pytest
import torch

from models.causal_lm import build_tiny_llama, load_causal_lm


def test_tiny_llama_has_gqa_and_expected_size():
    model = build_tiny_llama()
    cfg = model.config
    assert cfg.num_attention_heads == 4 and cfg.num_key_value_heads == 2
    attn = model.model.layers[0].self_attn
    assert attn.k_proj.weight.shape == (2 * 16, 64)
    # embeddings (tied) + 2 x (q,k,v,o + gate,up,down + 2 norms) + final norm
    per_layer = 64 * 64 * 2 + 32 * 64 * 2 + 3 * 64 * 128 + 2 * 64
    assert sum(p.numel() for p in model.parameters()) == 256 * 64 + 2 * per_layer + 64


def test_local_directory_round_trip(tmp_path):
    from tests.test_llm_data import byte_tokenizer

    model = build_tiny_llama(seed=3)
    model.save_pretrained(tmp_path)
    byte_tokenizer().save_pretrained(tmp_path)
    loaded, tok = load_causal_lm(str(tmp_path))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    assert tok.eos_token == "<eos>"


def test_unavailable_model_says_what_to_do(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match="smollm2-135m"):
        load_causal_lm("meta-llama/Llama-2-7b-hf")
