"""train.py / evaluate.py end to end on a tiny LLaMA: --ckpt_path never recalibrates, a changed recipe is
refused at parse time, a finished run is never overwritten, a failed run leaves no empty version, and a
checkpoint that would run code when unpickled is refused."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml

from lightning_modules.cli import CompressionCLI, EvaluationCLI, format_summary

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = {
    "trainer": {"accelerator": "cpu", "devices": 1, "max_steps": 0, "num_sanity_val_steps": 0,
                "enable_checkpointing": False, "enable_progress_bar": False, "enable_model_summary": False},
    "model": {"spec": {"class_path": "tests.lightning_helpers.TinyLlamaSpec"}, "evaluate_dense": True},
    "data": {"class_path": "tests.lightning_helpers.TinyTokens"},
    "compression": {"method": "svd_llm", "ratio": 0.3, "allocation": "v2", "calibration": {"progress": False}},
}


def config(tmp_path: Path, **changes) -> Path:
    cfg = json.loads(json.dumps(CONFIG))
    cfg["trainer"]["logger"] = {"class_path": "lightning.pytorch.loggers.TensorBoardLogger",
                                "init_args": {"save_dir": str(tmp_path / "out"), "name": "run"}}
    for key, value in changes.items():
        cfg[key] = value
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def fit(path: Path, *extra: str) -> CompressionCLI:
    return CompressionCLI(args=["fit", "--config", str(path), *extra])


@pytest.fixture
def finished(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = config(tmp_path)
    cli = fit(path)
    ckpt = tmp_path / "out" / "run" / "version_0" / "compressed.ckpt"
    assert ckpt.is_file() and (ckpt.parent / "summary.json").is_file()
    return path, ckpt, cli


def test_fit_writes_a_checkpoint_whose_plan_carries_the_recipe(finished):
    path, ckpt, cli = finished
    plan = torch.load(ckpt, weights_only=True)["compression_plan"]
    assert plan["recipe"]["ratio"] == 0.3 and plan["recipe"]["allocation"] == "v2"
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    assert summary["compression"]["allocation"] == "v2" and set(summary["dense"]) == {"a", "b"}


def test_evaluate_with_the_checkpoint_rebuilds_the_plan_and_scores_the_same(finished):
    path, ckpt, cli = finished
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    ev = EvaluationCLI(args=["test", "--config", str(path), "--ckpt_path", str(ckpt)])
    assert ev.model.pipeline is None and ev.model.plan_restored  # nothing was calibrated
    scores = {k: float(v) for k, v in ev.trainer.callback_metrics.items()}
    assert set(summary["test"]) == {"test/ppl/a", "test/ppl/b"}
    for key, value in summary["test"].items():
        assert scores[key] == pytest.approx(value, rel=1e-6)


def test_resuming_fit_from_the_checkpoint_never_recalibrates(finished, tmp_path):
    path, ckpt, _ = finished
    cli = fit(path, "--ckpt_path", str(ckpt))
    assert cli.model.pipeline is None and cli.model.plan_restored and cli.model.calibration_seconds == 0.0
    assert cli.model.plan["recipe"] == torch.load(ckpt, weights_only=True)["compression_plan"]["recipe"]


def test_a_changed_recipe_against_a_checkpoint_is_refused_before_anything_loads(finished, capsys):
    path, ckpt, _ = finished
    for cli, sub in ((CompressionCLI, "fit"), (EvaluationCLI, "test")):
        with pytest.raises(SystemExit) as exit_info:
            cli(args=[sub, "--config", str(path), "--ckpt_path", str(ckpt), "--compression.ratio", "0.4"])
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "--ckpt_path:" in err and "ratio: 0.3 -> 0.4" in err


def test_a_bad_recipe_value_is_one_error_line(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        fit(config(tmp_path), "--compression.ratio", "1.5")
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--compression: ratio must lie in (0, 1)" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()  # refused before any log version was made


def test_a_finished_version_is_never_overwritten(finished, tmp_path):
    path, ckpt, _ = finished
    before = ckpt.read_bytes(), (ckpt.parent / "summary.json").read_text()
    with pytest.raises(FileExistsError, match="already holds a finished run"):
        fit(path, "--trainer.logger.init_args.version", "0")
    assert (ckpt.read_bytes(), (ckpt.parent / "summary.json").read_text()) == before
    fit(path)  # without a fixed version the logger picks a new one
    assert (ckpt.parent.parent / "version_1" / "compressed.ckpt").is_file()


def test_a_failed_run_leaves_no_empty_version(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = config(tmp_path, compression={**CONFIG["compression"], "targets": ["no_such_layer"]})
    with pytest.raises(ValueError, match="'no_such_layer' matches no eligible"):
        fit(path)
    run_dir = tmp_path / "out" / "run"
    assert not run_dir.exists() or not any(run_dir.iterdir())


def test_a_checkpoint_that_would_run_code_is_refused(finished, tmp_path, capsys):
    from tests.malicious import malicious_checkpoint, malicious_pickle

    path, ckpt, _ = finished
    evil, marker = malicious_checkpoint(tmp_path / "evil.ckpt")  # torch's zip format, a code-running pickle inside
    legacy, legacy_marker = malicious_pickle(tmp_path / "evil_legacy.ckpt")
    runs = ((CompressionCLI, "fit", evil), (EvaluationCLI, "test", evil), (CompressionCLI, "fit", legacy))
    for cli, sub, path_ in runs:
        with pytest.raises(SystemExit) as exit_info:
            cli(args=[sub, "--config", str(path), "--ckpt_path", str(path_)])
        assert exit_info.value.code == 2
        assert "refusing to load" in capsys.readouterr().err
    from lightning_modules.checkpoint_io import AtomicCheckpointIO
    from lightning_modules.module import read_plan

    with pytest.raises(ValueError, match="refusing to load"):
        read_plan(str(evil))
    with pytest.raises(ValueError, match="refusing to load"):
        AtomicCheckpointIO().load_checkpoint(evil)
    with pytest.raises(ValueError, match="weights_only=False"):
        AtomicCheckpointIO().load_checkpoint(ckpt, weights_only=False)
    assert not marker.exists() and not legacy_marker.exists()


def test_summary_scores_the_dense_and_the_compressed_model_on_the_same_validation_batches(finished):
    path, ckpt, cli = finished
    summary = json.loads((ckpt.parent / "summary.json").read_text())
    dense = EvaluationCLI(args=["validate", "--config", str(path), "--compression", "null"])
    assert dense.model.plan is None  # the dense model, scored by the validation loop itself
    assert summary["dense_validation"]["ppl"] == pytest.approx(float(dense.trainer.callback_metrics["val/ppl"]),
                                                               rel=1e-6)
    compressed = EvaluationCLI(args=["validate", "--config", str(path), "--ckpt_path", str(ckpt)])
    assert summary["validation"]["val/ppl"] == pytest.approx(
        float(compressed.trainer.callback_metrics["val/ppl"]), rel=1e-6)
    # two different models (the tiny one loses 0.07 % at this ratio), both matched to 1e-6 above
    assert abs(summary["validation"]["val/ppl"] / summary["dense_validation"]["ppl"] - 1) > 1e-4
    line = next(x for x in format_summary(summary).splitlines() if x.startswith("validation perplexity"))
    ratio = summary["validation"]["val/ppl"] / summary["dense_validation"]["ppl"]
    assert line.endswith(f"({ratio:.3f}x)")
