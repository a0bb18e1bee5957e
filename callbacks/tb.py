"""TensorBoard views of a compression run: scalars, the per-layer rank chart, spectra, the rank table."""

from __future__ import annotations

import logging

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch import Trainer  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402

from compression import CompressionReport  # noqa: E402

log = logging.getLogger(__name__)


def rank_figure(report: CompressionReport) -> plt.Figure:
    """Bars: kept rank as a fraction of the break-even rank ``m n / (m + n)`` for every layer."""
    fig, ax = plt.subplots(figsize=(max(6, len(report.layers) * 0.06), 3.2), dpi=100)
    frac = [r.rank * (r.in_features + r.out_features) / (r.in_features * r.out_features) for r in report.layers]
    ax.bar(range(len(frac)), frac, width=1.0, color="tab:blue")
    ax.axhline(1 - report.ratio, color="tab:red", lw=1, ls="--", label=f"uniform at ratio {report.ratio:g}")
    ax.set_xlabel("layer (model order)")
    ax.set_ylabel("params kept / dense")
    ax.set_title(f"{report.method} / {report.allocation}: kept fraction per layer")
    ax.set_ylim(0, 1)
    ax.legend(loc="upper right", fontsize=8)
    fig.tight_layout()
    return fig


def spectra_figure(spectra: dict[str, torch.Tensor], ranks: dict[str, int]) -> plt.Figure:
    """Normalised singular values (log scale) with each layer's cut marked."""
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    for name, sigma in spectra.items():
        s = sigma.double() / sigma.max()
        line, = ax.semilogy(s.numpy(), lw=1, label=name)
        if name in ranks and ranks[name] < s.numel():
            ax.plot([ranks[name]], [float(s[ranks[name]])], "o", color=line.get_color(), ms=4)
    ax.set_xlabel("index")
    ax.set_ylabel("σ / σ_max (method's space)")
    ax.set_title("singular values; dots = truncation rank")
    ax.legend(fontsize=6)
    fig.tight_layout()
    return fig


def log_compression(trainer: Trainer, report: CompressionReport, spectra: dict[str, torch.Tensor]) -> None:
    """Scalars to every logger; figures and the text table to TensorBoard loggers."""
    summary = report.summary()
    scalars = {f"compress/{k}": float(v) for k, v in summary.items() if isinstance(v, int | float)}
    for logger in trainer.loggers:
        logger.log_metrics(scalars, step=trainer.global_step)
        if not isinstance(logger, TensorBoardLogger):
            continue
        writer = logger.experiment
        writer.add_figure("compress/ranks", rank_figure(report), global_step=trainer.global_step)
        if spectra:
            ranks = {r.name: r.rank for r in report.layers}
            writer.add_figure("compress/spectra", spectra_figure(spectra, ranks), global_step=trainer.global_step)
        # TensorBoard renders markdown: indent by 4 spaces for a fixed-width block
        table = "\n".join("    " + line for line in report.to_table().splitlines())
        writer.add_text("compress/rank_table", table, global_step=trainer.global_step)
        writer.flush()
