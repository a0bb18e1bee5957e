"""train.py / evaluate.py end to end on families other than LLaMA, each loaded from a ``save_pretrained`` folder
as a user's checkpoint would be: calibrate, compress, score, write the checkpoint, then rebuild the compressed
model from it in evaluate.py (forms, plan and weights) and score the same.

The families are the ones whose layouts carry something the matrix (``tests/test_architectures.py``) checks on
the library directly: 3-D experts linearized on load (Qwen3-MoE), an nn.Linear-subclass router left alone
(Phi-3.5-MoE), post-norm-only blocks (OLMo 2), score caps and sandwich norms (Gemma 2), parallel blocks with NoPE
layers (Cohere2), multi-head latent attention with shared experts (DeepSeek-V3), an nn.Linear router kept in
float32 by the family and left out of the targets (HunYuan-MoE), experts fed score-scaled copies of every token
(Llama 4), per-layer embeddings and layers reusing earlier layers' keys and values (Gemma 4), a MoE block beside a
dense MLP with a router reading its own norm (Gemma 4 MoE), experts stored as flat ``E·I x n`` matrices behind a
fused, clamped qkv (DBRX); and two families without a layout whose experts the generic path converts after its probe
(LFM2-MoE, whose activation is a plain function; Aria's text model, whose experts are stored for ``x W``)."""

from __future__ import annotations

import json

import pytest

from benchmarks.architectures import build
from lightning_modules.cli import CompressionCLI, EvaluationCLI
from tests.test_cli_runs import CONFIG, config

pytestmark = pytest.mark.usefixtures("one_thread")


# the layers the matrix factorizes in each (its svd_llm column): every expert matrix of the MoE families included
LAYERS = {"Qwen3-MoE": 19, "Phi-3.5-MoE": 24, "OLMo2": 14, "Gemma2": 14, "Cohere2": 14, "DeepSeek-V3": 24,
          "HunYuan-MoE": 30, "Llama-4": 22, "Gemma4": 32, "Gemma4-MoE": 30,
          "DBRX": 20}


# families without a layout whose experts the generic path converts (compression.forms), with the layers it factorizes
GENERIC_LAYERS = {"lfm2_moe": 17, "aria_text": 46}


@pytest.mark.parametrize("family", list(LAYERS))
def test_fit_then_evaluate_from_a_saved_folder(family, tmp_path, monkeypatch):
    _fit_then_evaluate(build(family).float(), family, LAYERS[family], tmp_path, monkeypatch)


@pytest.mark.parametrize("model_type", list(GENERIC_LAYERS))
def test_generic_experts_fit_then_evaluate_from_a_saved_folder(model_type, tmp_path, monkeypatch):
    """The generic path's converted experts (no layout) are calibrated, factorized and rebuilt from the checkpoint
    (its forms entry replays the reading) in evaluate.py as a layout family's are."""
    from tests.test_transformers_families import _build

    _fit_then_evaluate(_build(model_type), model_type, GENERIC_LAYERS[model_type], tmp_path, monkeypatch)


def _fit_then_evaluate(model, family, layers, tmp_path, monkeypatch):
    from tests.test_llm_data import byte_tokenizer

    folder = tmp_path / "model"
    model.save_pretrained(folder)
    byte_tokenizer().save_pretrained(folder)
    monkeypatch.chdir(tmp_path)
    spec = {"class_path": "lightning_modules.specs.CausalLMSpec", "init_args": {"name_or_path": str(folder)}}
    path = config(tmp_path, model={**CONFIG["model"], "spec": spec})
    cli = CompressionCLI(args=["fit", "--config", str(path)])
    ckpt = tmp_path / "out" / "run" / "version_0" / "compressed.ckpt"
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    assert summary["compression"]["layers"] == layers, summary["compression"]
    assert 0.2 < summary["compression"]["params_ratio"] < 0.4
    compressed = summary["test"]
    dense = {f"test/ppl/{k}": v["ppl"] for k, v in summary["dense"].items()}
    assert set(dense) == set(compressed) == {"test/ppl/a", "test/ppl/b"}
    # random weights, 128 tokens: every perplexity near 128, the compressed ones within 5 % of the dense
    for key, value in compressed.items():
        assert 100 < dense[key] < 160 and value == pytest.approx(dense[key], rel=0.05), (family, key)
    ev = EvaluationCLI(args=["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    assert ev.model.pipeline is None and ev.model.plan_restored  # rebuilt from the checkpoint, not recalibrated
    scores = {k: float(v) for k, v in ev.trainer.callback_metrics.items()}
    for key, value in compressed.items():
        assert scores[key] == pytest.approx(value, rel=1e-6), (family, key)
    del cli
