"""What the compression callbacks hand to each other during one run.

The state lives on the LightningModule (``pl_module.compression_state``), never as
attributes on the layers being compressed.  Compression callbacks expose
``run_compression_stage(trainer, pl_module)``; ``CompressionModule.configure_model`` calls
them in ``trainer.callbacks`` order when fitting (collection -> reallocation -> truncation),
before the strategy wraps the model.  Each checks that what it needs is there and says
which callback to add or move when it is not.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from lightning.pytorch import LightningModule, Trainer

from compression import ActivationStats, Allocation, CompressionReport


@dataclass
class CompressionState:
    stats: ActivationStats | None = None
    allocation: Allocation | None = None
    allocation_name: str = "uniform"
    components: dict[str, list[int]] = field(default_factory=dict)  # gradient "subset" mode: triplets kept
    quantization: dict | None = None  # the plan's quantization section, once applied
    report: CompressionReport | None = None
    dense_metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    calibration_seconds: float = 0.0


def get_state(pl_module: LightningModule) -> CompressionState:
    state = getattr(pl_module, "compression_state", None)
    if state is None:
        state = CompressionState()
        pl_module.compression_state = state
    return state


def already_compressed(pl_module: LightningModule) -> bool:
    """True when the model carries a plan (compressed in this run or restored from a checkpoint)."""
    return getattr(pl_module, "plan", None) is not None


def plan_restored(pl_module: LightningModule) -> bool:
    """True when the plan came from a checkpoint (not made by this run's compression stages)."""
    return bool(getattr(pl_module, "plan_restored", False))


def find_callback(trainer: Trainer, cls: type, needed_by: str):
    for cb in trainer.callbacks:
        if isinstance(cb, cls):
            return cb
    raise RuntimeError(f"{needed_by} needs a {cls.__name__} callback in trainer.callbacks; add one to the config")


def spread_batches(loader: Iterable, max_batches: int | None) -> Iterator[Any]:
    """``max_batches`` batches evenly spaced over ``loader`` (all of them when ``None``).

    Calibration loaders are not shuffled, and a ``mix:`` source lists one corpus after the other:
    the first batches would all come from the first corpus. A loader without ``len`` gives its
    first ``max_batches`` batches.
    """
    try:
        total = len(loader)  # type: ignore[arg-type]
    except TypeError:
        total = None
    if max_batches is None or total is None or max_batches >= total:
        for i, batch in enumerate(loader):
            if max_batches is not None and i >= max_batches:
                return
            yield batch
        return
    if max_batches <= 0:
        return
    keep = {round(i * (total - 1) / max(max_batches - 1, 1)) for i in range(max_batches)}
    last = max(keep)
    for i, batch in enumerate(loader):
        if i in keep:
            yield batch
        if i >= last:
            return
