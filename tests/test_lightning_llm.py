"""The Lightning pipeline on a tiny LLaMA: calibrate -> reallocate -> truncate -> checkpoint -> evaluate."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import RankReallocation, SVDTruncation, WhiteningCollection
from compression import LowRankLinear
from lightning_modules import CausalLMSpec, CompressionModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from tests.conftest import make_tiny_llama
from tests.lightning_helpers import TinyTokens


def trainer(tmp_path, callbacks=(), **kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=0, callbacks=list(callbacks), enable_progress_bar=False,
                   logger=TensorBoardLogger(tmp_path, name="run"), plugins=[AtomicCheckpointIO()],
                   enable_model_summary=False, num_sanity_val_steps=0, **kw)


def compression_callbacks(method="svd_llm", allocation=True, **kw):
    cbs = [WhiteningCollection(progress=False)]
    if allocation:
        cbs.append(RankReallocation("v2"))
    cbs.append(SVDTruncation(method=method, ratio=0.3, **kw))
    return cbs


def test_fit_compresses_logs_and_evaluates_identically_after_reload(tmp_path):
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()))
    dm = TinyTokens()
    t = trainer(tmp_path, compression_callbacks(evaluate_dense=True))
    t.fit(module, datamodule=dm)
    state = module.compression_state
    assert module.plan is not None and module.plan["allocation"] == "v2"
    assert len(module.plan["layers"]) == 14
    assert sum(isinstance(m, LowRankLinear) for m in module.model.modules()) == 14
    assert set(state.dense_metrics) == {"a", "b"} and state.dense_metrics["a"]["ppl"] > 1
    assert 0.3 <= state.report.params_ratio < 0.36
    in_memory = t.test(module, datamodule=dm, verbose=False)[0]
    ckpt = tmp_path / "compressed.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=False)["compression_plan"] == module.plan

    # a fresh dense model with other weights: the plan rebuilds the structure, the weights load
    fresh = CompressionModule(CausalLMSpec(model=make_tiny_llama(seed=7)))
    reloaded = trainer(tmp_path / "eval").test(fresh, datamodule=dm, ckpt_path=ckpt, verbose=False)[0]
    assert reloaded.keys() == in_memory.keys() == {"test/ppl/a", "test/ppl/b"}
    for key in in_memory:
        assert reloaded[key] == pytest.approx(in_memory[key], rel=1e-6)

    # TensorBoard got the scalars, the figures and the rank table
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(t.logger.log_dir), size_guidance={"images": 0, "tensors": 0})
    events.Reload()
    tags = events.Tags()
    assert "compress/params_ratio" in tags["scalars"]
    assert {"compress/ranks", "compress/spectra"} <= set(tags["images"])
    assert any("compress/rank_table" in tag for tag in tags["tensors"])


def test_missing_collection_callback_is_explained(tmp_path):
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()))
    t = trainer(tmp_path, [SVDTruncation(method="svd_llm")])
    with pytest.raises(RuntimeError, match="WhiteningCollection callback before SVDTruncation"):
        t.fit(module, datamodule=TinyTokens())


def test_plain_svd_needs_no_calibration(tmp_path):
    module = CompressionModule(CausalLMSpec(model=make_tiny_llama()))
    trainer(tmp_path, [SVDTruncation(method="svd", ratio=0.5)]).fit(module, datamodule=TinyTokens())
    assert module.compression_state.report.method == "svd"


def test_bad_truncation_arguments_fail_before_anything_loads():
    with pytest.raises(ValueError, match="ratio"):
        SVDTruncation(ratio=1.2)
    with pytest.raises(ValueError, match="valid fields"):
        SVDTruncation(method="asvd", method_args={"alfa": 0.5})
    with pytest.raises(ValueError, match="unknown rank allocation"):
        RankReallocation("greedy")
