"""The LightningCLI behind ``train.py`` and ``evaluate.py``.

``train.py fit`` builds the model, runs the compression recipe (``--compression``, see
:class:`compression.Recipe`: ``--compression.ratio 0.4``, ``--compression.method asvd``,
``--compression.quantization.weight_bits 4``, ``--compression.lora.steps [100,100]``), trains
whatever is trainable (LoRA stages), writes ``<log_dir>/compressed.ckpt`` atomically and, by
default, tests on every test corpus and prints a dense-vs-compressed summary (also written to
``<log_dir>/summary.json``).

Checked before any model is built: the recipe (a bad value is one ``error:`` line naming the
field), a checkpoint given with ``--ckpt_path`` (its plan is read safely and the recipe must match
the one it was made with), and a log version that already holds a finished run (never
overwritten).  A run that fails leaves no log version without a checkpoint behind.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
from pathlib import Path

from jsonargparse import Namespace
from lightning.pytorch import LightningDataModule
from lightning.pytorch.cli import LightningCLI

from compression import Recipe
from lightning_modules.checkpoint_io import AtomicCheckpointIO
from lightning_modules.module import CompressionModule, check_recipe, read_plan

log = logging.getLogger(__name__)

FINISHED = ("compressed.ckpt", "summary.json")


class CompressionCLI(LightningCLI):
    def __init__(self, **kwargs) -> None:
        self._start = time.perf_counter()
        self._finished = False
        kwargs.setdefault("save_config_kwargs", {"overwrite": True})
        atomic_io = {"class_path": f"{AtomicCheckpointIO.__module__}.{AtomicCheckpointIO.__name__}"}
        kwargs.setdefault("trainer_defaults", {"plugins": [atomic_io]})
        kwargs.setdefault("seed_everything_default", 0)
        try:
            super().__init__(CompressionModule, LightningDataModule, subclass_mode_data=True, **kwargs)
        except BaseException:
            self._discard_unfinished_version()
            raise

    # -- arguments ----------------------------------------------------------------------------------
    def add_core_arguments_to_parser(self, parser) -> None:
        parser.add_lightning_class_args(self.trainer_class, "trainer")
        parser.set_defaults({"trainer." + k: v for k, v in self.trainer_defaults.items() if k != "callbacks"})
        # the recipe is the top-level --compression, not --model.compression
        parser.add_class_arguments(CompressionModule, "model", fail_untyped=False, sub_configs=True,
                                   skip={"compression"})
        parser.add_lightning_class_args(self._datamodule_class, "data", subclass_mode=self.subclass_mode_data)

    def add_arguments_to_parser(self, parser) -> None:
        parser.add_argument("--compression", type=Recipe | None, default=None,
                            help="The compression recipe (compression.Recipe; null: a dense run). Every field is a "
                                 "flag: --compression.ratio 0.4, --compression.method asvd, --compression.allocation "
                                 "v2, --compression.quantization.weight_bits 4, --compression.lora.steps [100,100]. "
                                 "--compression.help Recipe lists them all.")
        parser.add_argument("--test_after_fit", type=bool, default=True,
                            help="After fit, validate and test on every test corpus and print the dense-vs-compressed "
                                 "summary.")
        parser.add_argument("--save_compressed", type=bool, default=True,
                            help="After fit, write <log_dir>/compressed.ckpt (atomic; carries the plan).")

    def _parse_ckpt_path(self) -> None:
        # LightningCLI reads the checkpoint's hyper-parameters here (weights_only=True); check the file first so
        # a missing, unreadable or code-carrying checkpoint is one `error:` line, not a traceback
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt:
            try:
                read_plan(ckpt)
            except (FileNotFoundError, ValueError) as err:
                self.parser.error(f"--ckpt_path: {err}")
        super()._parse_ckpt_path()

    def _config(self) -> Namespace:
        return self.config[self.subcommand] if self.subcommand else self.config

    def before_instantiate_classes(self) -> None:
        cfg = self._config()
        raw = cfg.get("compression")
        if raw is not None:
            try:
                recipe = Recipe.from_dict(raw.as_dict() if isinstance(raw, Namespace) else dict(vars(raw)))
            except (TypeError, ValueError) as err:
                self.parser.error(f"--compression: {err}")
        else:
            recipe = None
        ckpt = cfg.get("ckpt_path")
        if ckpt:
            try:
                plan = read_plan(ckpt)
                if plan is not None:
                    check_recipe(recipe, plan, ckpt)
            except (FileNotFoundError, ValueError) as err:
                self.parser.error(f"--ckpt_path: {err}")

    def instantiate_classes(self) -> None:
        super().instantiate_classes()
        cfg = self._config()
        recipe = self.config_init[self.subcommand]["compression"] if self.subcommand else None
        self.model.recipe = recipe
        self.model.checkpoint_path = cfg.get("ckpt_path")

    # -- log versions -------------------------------------------------------------------------------
    def _log_dir(self) -> Path:
        return Path(self.trainer.log_dir or self.trainer.default_root_dir)

    def before_fit(self) -> None:
        if not self.trainer.is_global_zero:
            return
        done = [name for name in FINISHED if (self._log_dir() / name).exists()]
        if done and self._config().get("save_compressed", True):
            raise FileExistsError(
                f"{self._log_dir()} already holds a finished run ({', '.join(done)}); it is never overwritten. "
                "Let the logger pick a new version (drop --trainer.logger.init_args.version) or remove that folder")

    def _discard_unfinished_version(self) -> None:
        """After a failure: remove this run's log version if it holds no checkpoint (nothing to resume)."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or not trainer.is_global_zero or trainer.logger is None or trainer.log_dir is None:
            return
        folder = Path(trainer.log_dir)
        if folder.is_dir() and not any(folder.rglob("*.ckpt")) and not (folder / "summary.json").exists():
            shutil.rmtree(folder, ignore_errors=True)
            log.info("removed %s: the run failed before writing anything to resume from", folder)

    # -- after the run ------------------------------------------------------------------------------
    def after_fit(self) -> None:
        cfg = self._config()
        ckpt = None
        if cfg.get("save_compressed", True):
            ckpt = self._log_dir() / "compressed.ckpt"
            # the whole training state (optimizer, loops, callbacks) so `--ckpt_path` can resume from it; said
            # explicitly, or Lightning logs "`weights_only` was not set, defaulting to `False`", which reads like
            # unpickling -- every load in this project is weights_only=True (checkpoint_io.py)
            self.trainer.save_checkpoint(ckpt, weights_only=False)
        results, validation = {}, {}
        if cfg.get("test_after_fit", True) and self.datamodule is not None:
            # validation logs val/ppl to TensorBoard even when fit trained nothing (max_steps: 0)
            for d in self.trainer.validate(self.model, datamodule=self.datamodule, verbose=False):
                validation.update({k: float(v) for k, v in d.items()})
            out = self.trainer.test(self.model, datamodule=self.datamodule, verbose=False)
            for d in out:
                results.update({k: float(v) for k, v in d.items()})
        if self.trainer.is_global_zero:
            summary = build_summary(self.model, results, time.perf_counter() - self._start, ckpt, validation)
            from compression.io import atomic_write_text

            atomic_write_text(self._log_dir() / "summary.json", json.dumps(summary, indent=1))
            print(format_summary(summary))  # the CLI's own output: the figures a user launched it for

    def after_test(self) -> None:
        if self.trainer.is_global_zero:
            metrics = {k: float(v) for k, v in self.trainer.callback_metrics.items()}
            print(json.dumps(metrics, indent=1))

    after_validate = after_test


def build_summary(module: CompressionModule, test_results: dict[str, float], seconds: float, ckpt,
                  validation: dict[str, float] | None = None) -> dict:
    report = module.report
    out: dict = {"wall_seconds": seconds, "checkpoint": str(ckpt) if ckpt else None, "test": test_results,
                 "dense": module.dense_metrics, "calibration_seconds": module.calibration_seconds}
    if validation:
        out["validation"] = validation
    if module.dense_val_metrics:
        out["dense_validation"] = module.dense_val_metrics
    if report is not None and report.layers:
        out["compression"] = report.summary()
    quant = (module.plan or {}).get("quantization") if not module.plan_restored else None
    if quant is not None:
        out["quantization"] = {"weight_bits": (quant["weight"] or {}).get("bits"),
                               "act_bits": (quant["act"] or {}).get("bits"), "layers": len(quant["layers"]),
                               "rotation": "rotation" in module.plan}
    return out


def format_summary(summary: dict) -> str:
    lines = ["", "=" * 72]
    comp = summary.get("compression")
    if comp:
        lines.append(f"method {comp['method']} / allocation {comp['allocation']}, ratio asked {comp['ratio_asked']}")
        factored = (f"{comp['targeted_params_before']:,} -> {comp['targeted_params_after']:,} "
                    f"({comp['params_ratio']:.2%} removed)")
        kept = comp.get("kept_dense_params", 0)
        before, after = comp["targeted_params_before"] + kept, comp["targeted_params_after"] + kept
        targets = (f"targeted layers {before:,} -> {after:,} "
                   f"({comp['targets_ratio']:.2%} removed; {comp['kept_dense']} matrices kept dense, the factorized "
                   f"ones {factored})" if kept else f"targeted layers {factored}")
        lines.append(f"parameters: model {comp['model_params_before']:,} -> {comp['model_params_after']:,} "
                     f"({comp['model_params_ratio']:.2%} removed); {targets}")
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
        ratios = [value / dense[key.split("/")[2]]["ppl"] for key, value in test.items()
                  if key.startswith("test/ppl/") and dense.get(key.split("/")[2], {}).get("ppl")]
        if len(ratios) > 1:
            gmean = math.exp(sum(math.log(r) for r in ratios) / len(ratios))
            lines.append(f"perplexity / dense, geometric mean over {len(ratios)} test sets: {gmean:.3f} "
                         f"(worst {max(ratios):.3f})")
    val = (summary.get("validation") or {}).get("val/ppl")
    dense_val = (summary.get("dense_validation") or {}).get("ppl")
    if val is not None and dense_val:
        lines.append(f"validation perplexity: dense {dense_val:.3f}, compressed {val:.3f} ({val / dense_val:.3f}x)")
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
