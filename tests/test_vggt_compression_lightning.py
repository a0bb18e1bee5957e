"""A compressed VGGT checkpoint through Lightning: U/V LoRA resumes exactly, and it evaluates identically after reload.

Tiny random-init VGGT, synthetic 2-view scenes at 28x28 (batch 1), SVD-LLM at ratio 0.3 on the
default targets, then ``UVLoRA`` (V then U) with the multi-task loss.
"""

from __future__ import annotations

import pytest
import torch
from lightning.pytorch import Callback, Trainer

from compression import Recipe
from data.multiview.datamodule import MultiViewDataModule
from lightning_modules import CompressionModule, VGGTSpec
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from metrics.flops import vggt_flops
from tests.lightning_helpers import cpu_trainer

STEPS = [3, 3]  # stage 1 = steps 0-2, stage 2 = steps 3-5; 4 training scenes per epoch


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: see conftest


class Losses(Callback):
    def __init__(self) -> None:
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


class OrderedScenes(MultiViewDataModule):
    """Training scenes in a fixed order (a resumed epoch then replays exactly the same batches)."""

    def train_dataloader(self):
        return self._loader("train", shuffle=False)


def data() -> OrderedScenes:
    return OrderedScenes(num_views=2, image_size=(28, 28), train_scenes=4, val_scenes=2, test_scenes=2,
                         calibration_scenes=2, seed=0, batch_size=1)


def spec(seed: int = 0) -> VGGTSpec:
    torch.manual_seed(seed)  # the spec builds a random-init model: a resumed run must not rely on it
    return VGGTSpec(config_overrides={"frames_chunk_size": None})


def fit(tmp_path, name, max_steps=-1, ckpt_path=None, every=None, seed=0):
    rec = Losses()
    trainer = cpu_trainer(tmp_path / name, [rec], max_steps, every)
    recipe = Recipe("svd_llm", ratio=0.3, calibration={"progress": False},
                    lora={"steps": STEPS, "r": 2, "alpha": 4, "dropout": 0.0, "learning_rate": [1e-2, 5e-3]})
    module = CompressionModule(spec(seed), compression=recipe, learning_rate=5e-3)
    trainer.ckpt_path = ckpt_path  # configure_model sees it and rebuilds the plan (no recalibration)
    trainer.fit(module, datamodule=data())
    trainer.ckpt_path = None
    return module, rec, trainer


def test_vggt_lora_resume_inside_stage_two_reproduces_the_run(tmp_path):
    full, full_rec, _ = fit(tmp_path, "full")
    assert len(full_rec.losses) == 6 and all(torch.isfinite(torch.tensor(full_rec.losses)))
    fit(tmp_path, "cut", max_steps=4, every=4)
    resumed, rec, trainer = fit(tmp_path, "resumed", ckpt_path=tmp_path / "ckpt" / "step=4.ckpt", seed=7)
    assert resumed.pipeline is None and resumed.plan_restored  # plan rebuilt, nothing recalibrated
    assert trainer.global_step == 6
    assert rec.losses == pytest.approx(full_rec.losses[4:], rel=1e-6, abs=1e-7)
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)


def test_compressed_vggt_checkpoint_evaluates_identically_after_reload(tmp_path):
    trainer = Trainer(accelerator="cpu", devices=1, max_steps=0, logger=False, enable_progress_bar=False,
                      enable_model_summary=False, num_sanity_val_steps=0, plugins=[AtomicCheckpointIO()])
    module = CompressionModule(spec(), compression=Recipe("svd_llm_v2", ratio=0.4, calibration={"progress": False}))
    dm = data()
    trainer.fit(module, datamodule=dm)
    first = trainer.test(module, datamodule=dm, verbose=False)[0]
    ckpt = tmp_path / "compressed.ckpt"
    trainer.save_checkpoint(ckpt)
    assert first["test/gflops/test"] == pytest.approx(vggt_flops(module.model, 2, (28, 28))["total"])
    # evaluate.py's path: a fresh (differently initialised) module, the plan rebuilt from the checkpoint
    fresh = CompressionModule(spec(seed=5))
    again = Trainer(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False).test(fresh, datamodule=data(), ckpt_path=ckpt, verbose=False)[0]
    assert again.keys() == first.keys()
    for key, value in first.items():
        assert again[key] == pytest.approx(value, rel=1e-6, abs=1e-9), key
    assert fresh.plan == module.plan
