"""Rank reallocation: decide every factorized matrix's rank before truncation.

The matrices are those :meth:`SVDTruncation.matrices <callbacks.truncation.SVDTruncation.matrices>`
names: single layers, and with ``joint_qkv`` the stacked q/k/v of each attention module.

- ``uniform``: every matrix at the truncation ratio.
- ``v2`` (SVD-LLM V2): heterogeneous ratios within each matrix type from each matrix's
  theoretical truncation loss (:mod:`compression.allocation`), in the truncation method's space,
  so the allocation sees the same spectra that truncation will cut.  Joint q/k/v groups form
  their own type.
- ``gradient`` (QSVD): every singular value of every matrix gets the importance
  ``mean_b (σ_i u_iᵀ G_b r_i)²`` from calibration-loss gradients ``G_b``
  (:func:`compression.gradient_importance`; the loss is the family spec's ``training_loss``,
  one sample per backward with ``per_sample``), and one global ranking keeps the most important
  components per parameter under the budget ``(1 - ratio) Σ m n``
  (:func:`compression.gradient_allocation`), so the parameters kept never exceed what uniform
  truncation keeps.  ``mode="count"`` keeps each matrix's leading triplets, as many as the
  ranking chose; ``mode="subset"`` keeps exactly the chosen triplets of joint groups (as the
  paper does; single layers keep their leading ones).

Under DDP each rank scores its own calibration shard and the importance sums are all-reduced
before the (deterministic) selection, so every rank decides the same ranks.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer

from callbacks.state import already_compressed, find_callback, get_state, spread_batches
from compression import Allocation, allocate, build_method, gradient_allocation, gradient_importance
from compression.allocation import v2_ratios
from compression.joint import joint_rank_for_ratio, stacked_weight
from compression.lowrank import rank_for_ratio
from compression.targets import layer_type

log = logging.getLogger(__name__)

STRATEGIES = ("uniform", "v2", "gradient")


class RankReallocation(Callback):
    """Decide ranks before :class:`~callbacks.truncation.SVDTruncation` (list it before that callback).

    Args:
        strategy: ``uniform``, ``v2`` or ``gradient`` (see the module docstring).
        max_batches: calibration batches used for the gradient importance, evenly spaced over the
            calibration loader (``None``: all).
        per_sample: split each calibration batch into single samples, so the importance is the
            per-sample mean of squares as in QSVD (costs one backward per sample).
        mode: ``gradient`` only -- ``count`` (leading triplets) or ``subset`` (the chosen triplets
            of joint groups).
        min_rank: ``gradient`` only -- components every matrix keeps whatever their importance.
    """

    def __init__(self, strategy: str = "v2", max_batches: int | None = 16, per_sample: bool = True,
                 mode: Literal["count", "subset"] = "count", min_rank: int = 1) -> None:
        if strategy not in STRATEGIES:
            raise ValueError(f"unknown rank allocation strategy {strategy!r}; choose one of {STRATEGIES}")
        if mode not in ("count", "subset"):
            raise ValueError(f"mode must be 'count' or 'subset', got {mode!r}")
        if max_batches is not None and max_batches < 1:
            raise ValueError(f"max_batches must be >= 1 or None, got {max_batches}")
        if min_rank < 1:
            raise ValueError(f"min_rank must be >= 1, got {min_rank}")
        self.strategy, self.max_batches, self.per_sample = strategy, max_batches, per_sample
        self.mode, self.min_rank = mode, min_rank

    def run_compression_stage(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if already_compressed(pl_module):
            return
        from callbacks.truncation import SVDTruncation

        truncation = find_callback(trainer, SVDTruncation, "RankReallocation")
        state = get_state(pl_module)
        if state.report is not None:
            raise RuntimeError("RankReallocation ran after SVDTruncation: list it before SVDTruncation")
        if self.strategy != "uniform" and build_method(truncation.method_config).needs and state.stats is None:
            raise RuntimeError(f"{self.strategy} allocation with method {truncation.method_config.method_name()!r} "
                               "needs calibration statistics: list WhiteningCollection before RankReallocation")
        if self.strategy in ("uniform", "v2") and not truncation.joint_qkv:
            config = truncation.resolved_config(pl_module, allocation=self.strategy)
            state.allocation = allocate(pl_module.model, config, state.stats)
        else:
            if truncation.config.overrides or truncation.config.ranks:
                raise ValueError(f"{self.strategy} allocation over joint q/k/v groups decides every rank itself; "
                                 "remove SVDTruncation's overrides/ranks or use strategy uniform/v2 without joint_qkv")
            state.allocation = self._allocate(trainer, pl_module, truncation, state)
        state.allocation_name = self.strategy
        ranks = list(state.allocation.ranks.values())
        log.info("%s allocation: ranks %d..%d over %d matrices", self.strategy, min(ranks), max(ranks), len(ranks))

    # -- joint-aware allocation ---------------------------------------------------------------------
    def _allocate(self, trainer: Trainer, pl_module: LightningModule, truncation, state) -> Allocation:
        model = pl_module.model
        groups, singles = truncation.matrices(pl_module)
        matrices = {**groups, **{n: [n] for n in singles}}
        shapes = {}
        for key, names in matrices.items():
            layers = [model.get_submodule(n) for n in names]
            shapes[key] = (sum(lin.out_features for lin in layers), layers[0].in_features)
        ratio = truncation.config.ratio
        method = build_method(truncation.method_config)
        if self.strategy == "gradient":
            importance = self._importance(trainer, pl_module, matrices, method, state.stats)
            chosen = gradient_allocation(importance, shapes, ratio=ratio, min_rank=self.min_rank, mode=self.mode)
            if self.mode == "subset":
                state.components = {g: chosen.components[g] for g in groups}
            ranks = chosen.ranks
            log.info("gradient allocation keeps %d of a %d-parameter budget", chosen.used, chosen.budget)
            return Allocation(ranks, {k: 1 - ranks[k] * sum(shapes[k]) / (shapes[k][0] * shapes[k][1])
                                      for k in ranks})
        ratios = dict.fromkeys(matrices, ratio)
        spectra = {}
        if self.strategy == "v2":
            with torch.no_grad():
                for key, names in matrices.items():
                    weight = stacked_weight([model.get_submodule(n) for n in names])
                    stats = state.stats[names[0]] if state.stats is not None and names[0] in state.stats else None
                    spectra[key] = method.spectrum(weight, stats, key).cpu()
            ratios = v2_ratios(shapes, spectra, ratio, truncation.config.max_ratio,
                               group_of=lambda k: "joint_qkv" if k in groups else layer_type(k))
        ranks = {}
        for key, names in matrices.items():
            m, n = shapes[key]
            if key in groups:
                sizes = [model.get_submodule(x).out_features for x in names]
                ranks[key] = joint_rank_for_ratio(sizes, n, ratios[key])
            else:
                ranks[key] = rank_for_ratio(m, n, ratios[key])
        return Allocation(ranks, ratios, spectra)

    def _importance(self, trainer: Trainer, pl_module: LightningModule, matrices: dict[str, list[str]],
                    method, stats) -> dict[str, torch.Tensor]:
        """Importance of every singular triplet, from this rank's calibration shard, summed over ranks."""
        dm = trainer.datamodule
        if dm is None or not hasattr(dm, "calibration_dataloader"):
            raise RuntimeError("gradient allocation needs a datamodule with a calibration_dataloader() method")
        model = pl_module.model
        spec = pl_module.spec
        rank, world = trainer.global_rank, trainer.world_size
        batches = [trainer.strategy.batch_to_device(b) for b in self._shard(dm.calibration_dataloader(), rank, world)]
        if self.per_sample:
            batches = [s for b in batches for s in split_batch(b)]
        count = torch.tensor(float(len(batches)), dtype=torch.float64)
        was_training = model.training
        model.eval()  # no dropout: the importance is of the deterministic function
        try:
            if batches:
                importance = gradient_importance(model, matrices, batches, spec.training_loss, method, stats)
            else:
                importance = {k: torch.zeros(min(*self._shape(model, v)), dtype=torch.float64)
                              for k, v in matrices.items()}
        finally:
            model.train(was_training)
        from callbacks.calibration import all_reduce_fn

        reduce = all_reduce_fn(trainer)  # reduces in place: hand it copies
        device = trainer.strategy.root_device
        sums = {k: reduce((v * count).to(device), "sum").cpu() for k, v in importance.items()}
        total = float(reduce(count.clone().to(device), "sum"))
        if total == 0:
            raise ValueError("gradient allocation saw no calibration batch; check the calibration loader")
        return {k: v / total for k, v in sums.items()}

    def _shard(self, loader, rank: int, world: int) -> Iterator[Any]:
        for i, batch in enumerate(spread_batches(loader, self.max_batches)):
            if i % world == rank:
                yield batch

    @staticmethod
    def _shape(model, names: list[str]) -> tuple[int, int]:
        layers = [model.get_submodule(n) for n in names]
        return sum(lin.out_features for lin in layers), layers[0].in_features


def split_batch(batch: Any) -> list[Any]:
    """A batch as single-sample batches: dicts of tensors/lists sliced along their first dimension
    (entries of another length are shared), a tensor row by row; anything else stays whole."""
    if torch.is_tensor(batch):
        return [batch[i : i + 1] for i in range(batch.shape[0])]
    if not isinstance(batch, dict):
        return [batch]
    sizes = {len(v) for v in batch.values() if torch.is_tensor(v) and v.dim() > 0 or isinstance(v, list)}
    if len(sizes) != 1:
        return [batch]
    n = sizes.pop()
    out = []
    for i in range(n):
        sample = {}
        for key, value in batch.items():
            if torch.is_tensor(value) and value.dim() > 0 and len(value) == n:
                sample[key] = value[i : i + 1]
            elif isinstance(value, list) and len(value) == n:
                sample[key] = value[i : i + 1]
            else:
                sample[key] = value
        out.append(sample)
    return out
