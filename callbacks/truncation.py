"""SVD truncation: apply :func:`compression.compress_` before training, then log what it did.

A compression stage (run from ``CompressionModule.configure_model``, see
:mod:`callbacks.state`) after :class:`~callbacks.calibration.WhiteningCollection` and an
optional :class:`~callbacks.reallocation.RankReallocation`.  Stores the plan on the
LightningModule so every checkpoint carries it.

With ``joint_qkv`` (QSVD) the q/k/v of every attention module the family spec names
(:meth:`~lightning_modules.specs.ModelSpec.joint_groups`) are factorized as one stacked matrix
with a shared down projection (:func:`compression.compress_joint_`), at the rank that keeps the
parameters per-matrix SVD would keep at the same ratio; every other target is factorized per
matrix.  If any step fails, every layer is put back as it was.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import already_compressed, get_state
from callbacks.tb import log_compression
from compression import (
    CompressionConfig,
    JointQKVConfig,
    build_method,
    compress_,
    compress_joint_,
    merge_reports,
    select_targets,
)
from compression.joint import restore_joint_
from compression.targets import name_matches

log = logging.getLogger(__name__)


class SVDTruncation(Callback):
    """Replace the targeted ``nn.Linear`` layers by low-rank factors.

    Args:
        method: ``svd``, ``asvd``, ``svd_llm`` or ``svd_llm_v2``.
        method_args: that method's config fields, e.g. ``{"alpha": 0.5, "scaling": "abs_mean"}``
            for ``asvd`` or ``{"beta": 0.5}``.
        ratio: fraction of the targeted parameters to remove, in (0, 1).
        targets: module-name patterns (globs; a bare name matches as a suffix); ``None`` uses
            the model family's default targets.
        exclude: patterns removed from the targets.
        overrides: ``pattern -> {"ratio": x}`` or ``{"rank": r}``, first match wins.
        max_ratio: cap on any one layer's ratio under heterogeneous allocation.
        evaluate_dense: score the dense model on the test loaders before compressing
            (for the dense-vs-compressed summary; costs one extra evaluation pass).
        log_spectra: number of layers whose singular-value spectra are plotted to TensorBoard.
        joint_qkv: factorize the q/k/v of each attention module jointly, sharing one down
            projection (QSVD); the other targets stay per-matrix.  ``ratio`` keeps its meaning
            (fraction of the targeted parameters removed).
    """

    def __init__(
        self,
        method: str = "svd_llm",
        method_args: dict[str, Any] | None = None,
        ratio: float = 0.2,
        targets: list[str] | None = None,
        exclude: list[str] | None = None,
        overrides: dict[str, dict[str, float]] | None = None,
        max_ratio: float = 0.95,
        evaluate_dense: bool = False,
        log_spectra: int = 6,
        joint_qkv: bool = False,
    ) -> None:
        # Build once now so a bad method, argument or ratio fails before any model is loaded.
        self.method_config = build_method(method, **(method_args or {})).config
        self.config = CompressionConfig(self.method_config, ratio=ratio, targets=targets, exclude=list(exclude or []),
                                        overrides=dict(overrides or {}), max_ratio=max_ratio)
        self.evaluate_dense = evaluate_dense
        self.log_spectra = log_spectra
        self.joint_qkv = joint_qkv

    def resolved_config(self, pl_module: LightningModule, **changes: Any) -> CompressionConfig:
        """The config with the family's default targets filled in."""
        targets = self.config.targets
        if targets is None:
            targets = pl_module.spec.default_targets(pl_module.model)
        fields = {**self.config.__dict__, "targets": targets, **changes}
        return CompressionConfig(**fields)

    def selected_layers(self, pl_module: LightningModule) -> list[str]:
        cfg = self.resolved_config(pl_module)
        return select_targets(pl_module.model, cfg.targets, cfg.exclude, list(cfg.overrides)).names

    def matrices(self, pl_module: LightningModule) -> tuple[dict[str, list[str]], list[str]]:
        """What this truncation factorizes: ``(joint groups: attention module -> q/k/v names,
        the other targeted layers)``; no groups unless ``joint_qkv``."""
        names = self.selected_layers(pl_module)
        if not self.joint_qkv:
            return {}, names
        groups = pl_module.spec.joint_groups(pl_module.model, names)
        if not groups:
            raise ValueError(
                "joint_qkv=True but no attention module has all of its q/k/v projections among the targets; "
                "target them (e.g. targets: [q_proj, k_proj, v_proj, ...]) or set joint_qkv: false"
            )
        members = {n for group in groups.values() for n in group}
        return groups, [n for n in names if n not in members]

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if already_compressed(pl_module):
            log.info("model already compressed (plan restored); skipping truncation")
            return
        state = get_state(pl_module)
        if self.evaluate_dense:
            self._evaluate_dense(trainer, pl_module, state)
        if state.stats is None and build_method(self.method_config).needs:
            raise RuntimeError(
                f"method {self.config.method.method_name()!r} needs calibration statistics: put a "
                "WhiteningCollection callback before SVDTruncation in trainer.callbacks"
            )
        ranks = state.allocation.ranks if state.allocation is not None else {}
        config = self.resolved_config(pl_module, ranks=dict(ranks), allocation="uniform")
        spectra = self._spectra_to_plot(pl_module, config, state) if trainer.is_global_zero else {}
        with torch.no_grad():
            if self.joint_qkv:
                report = self._compress_joint(pl_module, state, dict(ranks))
            else:
                report = compress_(pl_module.model, config, state.stats)
        report.allocation = state.allocation_name
        report.plan["allocation"] = state.allocation_name
        pl_module.plan = report.plan
        state.report = report
        state.stats = None  # free the Grams: nothing downstream needs them
        log.info("compressed %d layers: removed %.4f of targeted parameters", len(report.layers),
                 report.params_ratio)
        if trainer.is_global_zero:
            log_compression(trainer, report, spectra)

    def _compress_joint(self, pl_module: LightningModule, state, ranks: dict[str, int]):
        """Joint q/k/v groups first, then the remaining targets per matrix; all restored on failure."""
        model = pl_module.model
        groups, singles = self.matrices(pl_module)
        components = {g: c for g, c in state.components.items() if g in groups}
        joint = JointQKVConfig(self.method_config, ratio=self.config.ratio,
                               ranks={g: r for g, r in ranks.items() if g in groups}, components=components)
        originals = {g: {n: model.get_submodule(n) for n in names} for g, names in groups.items()}
        reports = [compress_joint_(model, joint, state.stats, groups=groups, device=self.config.device)]
        if singles:
            # explicit names now, so drop the patterns that only matched q/k/v members
            overrides = {p: o for p, o in self.config.overrides.items() if any(name_matches(n, p) for n in singles)}
            config = self.resolved_config(pl_module, targets=singles, exclude=[], overrides=overrides,
                                          ranks={n: r for n, r in ranks.items() if n in singles},
                                          allocation="uniform")
            try:
                reports.append(compress_(model, config, state.stats))
            except BaseException:
                restore_joint_(model, originals)
                raise
        return merge_reports(*reports)

    @torch.no_grad()
    def _spectra_to_plot(self, pl_module: LightningModule, config: CompressionConfig, state) -> dict:
        """Singular values of ``log_spectra`` evenly spaced target layers, in the method's space."""
        if self.log_spectra <= 0:
            return {}
        names = select_targets(pl_module.model, config.targets, config.exclude, list(config.overrides)).names
        step = max(1, len(names) // self.log_spectra)
        chosen = names[::step][: self.log_spectra]
        known = state.allocation.spectra if state.allocation is not None else {}
        method = build_method(config.method)
        out = {}
        for name in chosen:
            if name in known:
                out[name] = known[name]
            else:
                stats = state.stats[name] if state.stats is not None and name in state.stats else None
                out[name] = method.spectrum(pl_module.model.get_submodule(name).weight, stats, name).cpu()
        return out

    @staticmethod
    def _evaluate_dense(trainer: Trainer, pl_module: LightningModule, state) -> None:
        dm = trainer.datamodule
        loaders = dm.test_dataloader()
        loaders = loaders if isinstance(loaders, list | tuple) else [loaders]
        names = list(getattr(dm, "test_names", None) or [f"test{i}" for i in range(len(loaders))])
        for name, loader in zip(names, loaders):
            state.dense_metrics[name] = pl_module.evaluate_loader(loader)
            log.info("dense %s: %s", name, state.dense_metrics[name])
