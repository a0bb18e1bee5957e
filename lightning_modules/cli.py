"""The LightningCLI behind ``train.py`` and ``evaluate.py``.

``train.py fit`` builds the model, runs the compression stages of the configured callbacks
(calibration -> reallocation -> truncation), trains whatever is trainable (LoRA stages),
writes ``<log_dir>/compressed.ckpt`` atomically and, by default, tests on every test corpus
and prints a dense-vs-compressed summary (also written to ``<log_dir>/summary.json``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.module import CompressionModule

log = logging.getLogger(__name__)


class CompressionCLI(LightningCLI):
    def __init__(self, **kwargs) -> None:
        self._start = time.perf_counter()
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        atomic_io = {"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}
        kwargs.setdefault("trainer_defaults", {"plugins": [atomic_io]})
        kwargs.setdefault("seed_everything_default", 0)
        super().__init__(CompressionModule, LightningDataModule, subclass_mode_data=True, **kwargs)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, validate and test on every test corpus and print the dense-vs-compressed "
                                 "summary.")
        parser.add_argument("--save_compressed", type=bool, default=True,
                            help="After fit, write <log_dir>/compressed.ckpt (atomic; carries the plan).")

    def _log_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def after_fit(self) -> None:
        cfg = self.config[self.subcommand]
        ckpt = None
        if cfg.get("save_compressed", True):
            ckpt = self._log_dir() / "compressed.ckpt"
            self.trainer.save_checkpoint(ckpt)
        results = {}
        if cfg.get("test_after_fit", True) and self.datamodule is not None:
            # validation logs val/ppl to TensorBoard even when fit trained nothing (max_steps: 0)
            self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False)
            out = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            for d in out:
                results.update({k: float(v) for k, v in d.items()})
        if self.trainer.is_global_zero:
            summary = build_summary(self.model, results, time.perf_counter() - self._start, ckpt)
            (self._log_dir() / "summary.json").write_text(json.dumps(summary, indent=1))
            print(format_summary(summary))  # the CLI's own output: the figures a user launched it for

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            print(json.dumps(metrics, indent=1))

    after_validate = after_test


def build_summary(module: CompressionModule, test_results: dict[str, float], seconds: float, ckpt) -> dict:
    state = getattr(module, "compression_state", None)
    report = state.report if state is not None else None
    out: dict = {"wall_seconds": seconds, "checkpoint": str(ckpt) if ckpt else None, "test": test_results}
    if state is not None:
        out["dense"] = state.dense_metrics
        out["calibration_seconds"] = state.calibration_seconds
    if report is not None:
        out["compression"] = report.summary()
    quant = getattr(state, "quantization", None) if state is not None else None
    if quant is not None:
        out["quantization"] = {"weight_bits": (quant["weight"] or {}).get("bits"),
                               "act_bits": (quant["act"] or {}).get("bits"), "layers": len(quant["layers"]),
                               "rotation": module.plan is not None and "rotation" in module.plan}
    return out


def format_summary(summary: dict) -> str:
    lines = ["", "=" * 72]
    comp = summary.get("compression")
    if comp:
        lines.append(f"method {comp['method']} / allocation {comp['allocation']}, ratio asked {comp['ratio_asked']}")
        lines.append(f"parameters: model {comp['model_params_before']:,} -> {comp['model_params_after']:,} "
                     f"({comp['model_params_ratio']:.2%} removed); targeted layers "
                     f"{comp['targeted_params_before']:,} -> {comp['targeted_params_after']:,} "
                     f"({comp['params_ratio']:.2%} removed)")
        lines.append(f"time: calibration {summary.get('calibration_seconds', 0):.1f} s, "
                     f"decomposition {comp['seconds']:.1f} s, whole run {summary['wall_seconds']:.1f} s")
    quant = summary.get("quantization")
    if quant:
        lines.append(f"quantization: W{quant['weight_bits'] or 'float'} A{quant['act_bits'] or 'float'} on "
                     f"{quant['layers']} layers, rotation {'H1 + online Hadamard' if quant['rotation'] else 'none'}")
    dense = summary.get("dense") or {}
    test = summary.get("test") or {}
    if test:
        lines.append(f"{'test set':<28} {'dense':>10} {'compressed':>12}")
        for key, value in sorted(test.items()):
            parts = key.split("/")  # test/<metric>/<corpus>
            corpus, metric = (parts[2], parts[1]) if len(parts) == 3 else (key, "")
            before = dense.get(corpus, {}).get(metric)
            before_s = f"{before:>10.3f}" if before is not None else f"{'-':>10}"
            lines.append(f"{corpus + ' ' + metric:<28} {before_s} {value:>12.3f}")
    if summary.get("checkpoint"):
        lines.append(f"compressed checkpoint: {summary['checkpoint']}")
    lines.append("=" * 72)
    return "\n".join(lines)


class EvaluationCLI(CompressionCLI):
    """``evaluate.py``: only ``validate`` and ``test``."""

    @staticmethod
    def subcommands() -> dict[str, set[str]]:
        return {k: v for k, v in LightningCLI.subcommands().items() if k in ("validate", "test")}


__all__ = ["CompressionCLI", "EvaluationCLI"]
