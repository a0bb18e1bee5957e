"""The Lightning pipeline on a tiny LLaMA: calibrate -> reallocate -> truncate -> checkpoint -> evaluate."""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Trainer
from lightning.pytorch.loggers import TensorBoardLogger

from callbacks import SVDTruncation
from compression import LowRankLinear, Recipe
from lightning_modules import CausalLMSpec, CompressionModule
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from tests.conftest import make_tiny_llama
from tests.lightning_helpers import TinyTokens


def trainer(tmp_path, callbacks=(), **kw) -> Trainer:
    return Trainer(accelerator="cpu", devices=1, max_steps=0, callbacks=list(callbacks), enable_progress_bar=False,
                   logger=TensorBoardLogger(tmp_path, name="run"), plugins=[AtomicCheckpointIO()],
                   enable_model_summary=False, num_sanity_val_steps=0, **kw)


def module(recipe: Recipe | None, **kw) -> CompressionModule:
    return CompressionModule(CausalLMSpec(model=make_tiny_llama(**kw)), compression=recipe)


V2 = Recipe("svd_llm", ratio=0.3, allocation="v2", calibration={"progress": False})


def test_fit_compresses_logs_and_evaluates_identically_after_reload(tmp_path):
    m = CompressionModule(CausalLMSpec(model=make_tiny_llama()), compression=V2, evaluate_dense=True)
    dm = TinyTokens()
    t = trainer(tmp_path)
    t.fit(m, datamodule=dm)
    assert [type(cb).__name__ for cb in t.callbacks if hasattr(cb, "run_compression_stage")] == [
        "WhiteningCollection", "RankReallocation", "SVDTruncation"]  # built from the recipe, in order
    assert m.plan is not None and m.plan["allocation"] == "v2" and m.plan["recipe"] == V2.to_dict()
    assert len(m.plan["layers"]) == 14
    assert sum(isinstance(x, LowRankLinear) for x in m.model.modules()) == 14
    assert set(m.dense_metrics) == {"a", "b"} and m.dense_metrics["a"]["ppl"] > 1
    assert 0.3 <= m.report.params_ratio < 0.36
    in_memory = t.test(m, datamodule=dm, verbose=False)[0]
    ckpt = tmp_path / "compressed.ckpt"
    t.save_checkpoint(ckpt)
    assert torch.load(ckpt, weights_only=True)["compression_plan"] == m.plan  # plain data only

    # a fresh dense model with other weights: the plan rebuilds the structure, the weights load
    fresh = module(None, seed=7)
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


def test_stage_callbacks_listed_by_hand_are_refused(tmp_path):
    with pytest.raises(ValueError, match=r"trainer.callbacks lists \['SVDTruncation'\].*--compression"):
        trainer(tmp_path, [SVDTruncation()]).fit(module(V2), datamodule=TinyTokens())


class NoCalibration(TinyTokens):
    calibration_dataloader = None


def test_plain_svd_needs_no_calibration(tmp_path):
    m = module(Recipe("svd", ratio=0.5))
    trainer(tmp_path).fit(m, datamodule=NoCalibration())
    assert m.report.method == "svd" and len(m.plan["layers"]) == 14
    with pytest.raises(RuntimeError, match="calibration needs a datamodule with a calibration_dataloader"):
        trainer(tmp_path).fit(module(V2), datamodule=NoCalibration())


def test_bad_recipe_fails_before_anything_loads():
    with pytest.raises(ValueError, match="ratio"):
        Recipe(ratio=1.2)
    with pytest.raises(ValueError, match="valid fields"):
        Recipe("asvd", method_args={"alfa": 0.5})
    with pytest.raises(ValueError, match="unknown allocation 'greedyy'.*gradient"):
        Recipe(allocation="greedyy")
    with pytest.raises(ValueError, match="quantization and lora in one recipe"):
        Recipe(quantization={"weight_bits": 4}, lora={"steps": 10})
    with pytest.raises(ValueError, match="calibration: unknown field"):
        Recipe(calibration={"max_batchez": 3})


class Checked(TinyTokens):
    """A datamodule that checks the model it will feed (as TextDataModule does for its tokenizer)."""

    seen: list = []

    def check_model(self, model) -> None:
        self.seen.append(type(model).__name__)
        raise ValueError("tokenizer 'tiny' has 200 ids, the model embeds 128")


def test_the_datamodule_checks_the_model_before_any_compression(tmp_path):
    m = module(V2)
    with pytest.raises(ValueError, match="the model embeds 128"):
        trainer(tmp_path).fit(m, datamodule=Checked())
    assert Checked.seen == ["LlamaForCausalLM"] and m.plan is None and m.pipeline is None
