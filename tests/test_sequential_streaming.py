"""``calibration.stream_weights`` through the Lightning module (the CLI's path): the model is built on ``meta``
and each block is read from the local safetensors just before it runs; the result equals the sequential run
on the whole loaded model."""

from __future__ import annotations

import pytest
import torch

from compression import Recipe
from compression.streaming import BlockStream
from lightning_modules import CompressionModule
from lightning_modules.specs import CausalLMSpec
from tests.conftest import make_tiny_llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = {"mode": "sequential", "propagate": "compressed", "progress": False}


def _fit(module):
    from lightning.pytorch import Trainer

    from tests.lightning_helpers import TinyTokens

    trainer = Trainer(accelerator="cpu", devices=1, max_steps=0, enable_progress_bar=False, logger=False,
                      enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0)
    trainer.fit(module, datamodule=TinyTokens())
    return module


def _save(folder, **kwargs):
    """A save_pretrained folder (safetensors weights and a tokenizer, which the loaded path reads)."""
    from models.causal_lm import build_byte_tokenizer

    make_tiny_llama(**kwargs).save_pretrained(folder)
    build_byte_tokenizer().save_pretrained(folder)


def _module(folder, dtype="float32", **calibration):
    recipe = Recipe("svd_llm", ratio=0.3, allocation="v2", calibration={**SEQ, **calibration})
    return CompressionModule(CausalLMSpec(name_or_path=str(folder), dtype=dtype), compression=recipe)


@pytest.mark.parametrize(("tie", "dtype"), [(True, "float32"), (False, "float64")])
def test_streamed_fit_equals_the_loaded_sequential_fit(tmp_path, monkeypatch, tie, dtype):
    """float64 from float32 files: the stream converts to the spec's dtype, as from_pretrained does."""
    _save(tmp_path / "dense", tie=tie)
    loaded = _fit(_module(tmp_path / "dense", dtype))

    seen = []  # at each block's turn, how many parameters of the *other* blocks are real
    before = BlockStream.before

    def spy(self, index, path, block):
        layers = streamed.model.model.layers
        seen.append(sum(p.device.type != "meta" for i, b in enumerate(layers) if i != index for p in b.parameters()))
        before(self, index, path, block)

    monkeypatch.setattr(BlockStream, "before", spy)
    streamed = _module(tmp_path / "dense", dtype, stream_weights=True)
    _fit(streamed)
    assert {t.dtype for t in streamed.model.state_dict().values() if t.is_floating_point()} == {getattr(torch, dtype)}
    assert streamed.weights_folder == str(tmp_path / "dense")
    assert seen == [0, 0, 0, 0]  # v2: a spectra pass, then the compression pass; never two blocks in memory
    assert streamed.plan["layers"] == loaded.plan["layers"] and len(streamed.report.blocks) == 2
    expected, got = loaded.model.state_dict(), streamed.model.state_dict()
    assert got.keys() == expected.keys()
    assert all(t.device.type == "cpu" for t in got.values())  # the compressed blocks are mapped back
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6, msg=key)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(streamed.model(ids).logits, loaded.model(ids).logits, rtol=0, atol=1e-5)
    errors = [r["output_error"] for r in streamed.report.blocks]
    assert errors == pytest.approx([r["output_error"] for r in loaded.report.blocks], rel=1e-5)


def test_stream_weights_refusals(tmp_path):
    with pytest.raises(ValueError, match="mode: sequential only"):
        Recipe("svd_llm", calibration={"stream_weights": True})
    recipe = Recipe("svd_llm", ratio=0.3, calibration={**SEQ, "stream_weights": True})
    assert recipe.differences(Recipe("svd_llm", ratio=0.3, calibration=SEQ)) == []  # a checkpoint resumes either way
    with pytest.raises(ValueError, match="given a built model"):
        _fit(CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=recipe))
    _save(tmp_path / "bin")
    (tmp_path / "bin" / "model.safetensors").rename(tmp_path / "bin" / "pytorch_model.bin")  # no safetensors
    with pytest.raises(ValueError, match="has neither"):
        _fit(_module(tmp_path / "bin", stream_weights=True))
    _save(tmp_path / "dense")
    with pytest.raises(ValueError, match="evaluate_dense false"):
        _fit(CompressionModule(CausalLMSpec(name_or_path=str(tmp_path / "dense")), compression=recipe,
                               evaluate_dense=True))


def test_rest_tensors_are_copied_from_their_files_in_chunks(tmp_path, monkeypatch):
    """The non-block tensors are written by copying their bytes from the source file (same dtype) or from memory
    (another dtype, or not in the files), a few bytes at a time; the file reads back exactly."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from compression import streaming

    g = torch.Generator().manual_seed(0)
    source = {"a": torch.randn(7, 13, generator=g), "b": torch.randn(5, generator=g).to(torch.bfloat16),
              "c": torch.arange(11, dtype=torch.int64)}
    save_file(source, str(tmp_path / "model.safetensors"))
    weights = streaming.ShardedWeights(tmp_path)
    state = {"a": weights.read("a"), "b": weights.read("b").float(), "c": weights.read("c"),
             "d": torch.tensor([True, False, True])}
    monkeypatch.setattr(streaming, "CHUNK", 40)  # 364 bytes of "a": ten chunks, the last one short
    streaming._save_copying(state, tmp_path / "rest.safetensors", weights)
    with safe_open(tmp_path / "rest.safetensors", "pt") as f:
        assert sorted(f.keys()) == ["a", "b", "c", "d"]
        for name, value in state.items():
            got = f.get_tensor(name)
            assert got.dtype == value.dtype and torch.equal(got, value), name
