"""Rank reallocation: decide every layer's rank before truncation.

``v2`` (SVD-LLM V2): heterogeneous per-type ratios from each matrix's theoretical
truncation loss (:mod:`compression.allocation`), at the truncation callback's ratio and
method, so the allocation sees the same transformed spectra that truncation will cut.
"""

from __future__ import annotations

import logging

from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import already_compressed, find_callback, get_state
from compression import allocate

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "v2")


class RankReallocation(Callback):
    """Args:
    strategy: ``uniform`` or ``v2``.
    """

    def __init__(self, strategy: str = "v2") -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown rank allocation strategy {strategy!r}; choose one of {STRATEGIES}")
        self.strategy = strategy

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if already_compressed(pl_module):
            return
        from callbacks.truncation import SVDTruncation

        truncation = find_callback(trainer, SVDTruncation, "RankReallocation")
        state = get_state(pl_module)
        if state.report is not None:
            raise RuntimeError("RankReallocation ran after SVDTruncation: list it before SVDTruncation")
        config = truncation.resolved_config(pl_module, allocation=self.strategy)
        state.allocation = allocate(pl_module.model, config, state.stats)
        state.allocation_name = self.strategy
        ranks = list(state.allocation.ranks.values())
        log.info("%s allocation: ranks %d..%d over %d layers", self.strategy, min(ranks), max(ranks), len(ranks))
