"""Activation statistics of ``nn.Linear`` inputs, collected through forward pre-hooks.

For an input stream ``X`` (all calibration tokens stacked, ``N x n``) one accumulator keeps

    gram     = XᵀX              (n x n, float64)   -- whitening (SVD-LLM, SVD-LLM V2)
    count    = N                (tokens seen)
    abs_sum  = Σ_t |x_t|        (n, float64)       -- ASVD abs-mean scaling
    abs_max  = max_t |x_t|      (n, float64)       -- ASVD abs-max scaling

Layers that read the *same tensor* (q/k/v after the attention norm, gate/up after the
MLP norm) share one accumulator: the public SVD-LLM code keeps one Gram per layer, seven
per block, which is most of its memory.  Sharing is discovered, not assumed: during a
forward, a pre-hook that sees the very tensor object the previous hook saw joins that
hook's accumulator.  The hook holds a reference to the last tensor, so its memory cannot be
recycled for another tensor and identity is exact.

Everything is a sum (or a max), so accumulators from several processes combine exactly:
:meth:`ActivationStats.reduce_` takes any ``fn(tensor, op)`` (e.g. an all-reduce).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch
from torch import nn

log = logging.getLogger(__name__)

ReduceFn = Callable[[torch.Tensor, str], torch.Tensor]
"""``fn(tensor, op)`` with ``op`` in ``{"sum", "max"}``; returns the reduced tensor."""


@dataclass
class ChannelStats:
    """Running statistics of one input stream with ``n`` channels (see module docstring)."""

    n: int
    with_gram: bool = True
    device: torch.device | str = "cpu"
    count: int = 0
    gram: torch.Tensor | None = None
    abs_sum: torch.Tensor = field(init=False)
    abs_max: torch.Tensor = field(init=False)

    def __post_init__(self) -> None:
        self.abs_sum = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        self.abs_max = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        if self.with_gram and self.gram is None:
            self.gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)

    @torch.no_grad()
    def update(self, x: torch.Tensor, name: str = "?") -> None:
        """Add the tokens of ``x [..., n]``; non-finite activations are an error naming the layer."""
        if x.shape[-1] != self.n:
            raise ValueError(f"{name}: input has {x.shape[-1]} channels, statistics expect {self.n}")
        x = x.detach().reshape(-1, self.n).to(device=self.abs_sum.device, dtype=torch.float64)
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"non-finite activation entering layer {name!r} during calibration; "
                "check the model's dtype (use float32/bfloat16, not float16 overflow) and the inputs"
            )
        ax = x.abs()
        self.count += x.shape[0]
        self.abs_sum += ax.sum(0)
        torch.maximum(self.abs_max, ax.amax(0), out=self.abs_max)
        if self.gram is not None:
            self.gram.addmm_(x.T, x)

    @property
    def abs_mean(self) -> torch.Tensor:
        """Per-channel ``mean_t |x_t|`` (n,)."""
        return self.abs_sum / max(self.count, 1)

    def reduce_(self, fn: ReduceFn) -> None:
        """Combine with the same accumulator on other processes (sums and max)."""
        counts = fn(torch.tensor([float(self.count)], dtype=torch.float64, device=self.abs_sum.device), "sum")
        self.count = int(round(counts.item()))
        self.abs_sum = fn(self.abs_sum, "sum")
        self.abs_max = fn(self.abs_max, "max")
        if self.gram is not None:
            self.gram = fn(self.gram, "sum")

    def check_finite(self, name: str) -> None:
        """Raise naming the layer and field when any statistic is NaN/inf."""
        fields = {"abs_sum": self.abs_sum, "abs_max": self.abs_max}
        if self.gram is not None:
            fields["gram"] = self.gram
        for key, value in fields.items():
            if not torch.isfinite(value).all():
                raise FloatingPointError(f"statistics for layer {name!r}: field {key!r} contains NaN/inf")

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        state: dict[str, torch.Tensor | int] = {
            "n": self.n,
            "count": self.count,
            "abs_sum": self.abs_sum.cpu(),
            "abs_max": self.abs_max.cpu(),
        }
        if self.gram is not None:
            state["gram"] = self.gram.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> ChannelStats:
        gram = state.get("gram")
        stats = cls(int(state["n"]), with_gram=gram is not None, device=device,
                    gram=None if gram is None else gram.to(device, torch.float64))
        stats.count = int(state["count"])
        stats.abs_sum = state["abs_sum"].to(device, torch.float64)
        stats.abs_max = state["abs_max"].to(device, torch.float64)
        return stats


class ActivationStats:
    """Statistics for a set of layers: ``owner[layer] -> key``, ``streams[key] -> ChannelStats``."""

    def __init__(self) -> None:
        self.streams: dict[str, ChannelStats] = {}
        self.owner: dict[str, str] = {}

    def __contains__(self, layer: str) -> bool:
        return layer in self.owner

    def __getitem__(self, layer: str) -> ChannelStats:
        try:
            return self.streams[self.owner[layer]]
        except KeyError:
            raise KeyError(
                f"no calibration statistics for layer {layer!r}; it was not hooked during calibration "
                f"(collected layers: {sorted(self.owner)[:5]}{'...' if len(self.owner) > 5 else ''})"
            ) from None

    def layers(self) -> list[str]:
        return list(self.owner)

    def shared_groups(self) -> dict[str, list[str]]:
        """``key -> layers`` for every stream read by more than one layer."""
        groups: dict[str, list[str]] = {}
        for layer, key in self.owner.items():
            groups.setdefault(key, []).append(layer)
        return {k: v for k, v in groups.items() if len(v) > 1}

    def reduce_(self, fn: ReduceFn) -> ActivationStats:
        """Combine every stream across processes, in a deterministic (sorted) order."""
        for key in sorted(self.streams):
            self.streams[key].reduce_(fn)
        return self

    def nbytes(self) -> int:
        total = 0
        for s in self.streams.values():
            total += s.abs_sum.nbytes + s.abs_max.nbytes + (s.gram.nbytes if s.gram is not None else 0)
        return total

    def state_dict(self) -> dict:
        return {
            "owner": dict(self.owner),
            "streams": {k: v.state_dict() for k, v in self.streams.items()},
        }

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> ActivationStats:
        stats = cls()
        stats.owner = dict(state["owner"])
        stats.streams = {k: ChannelStats.from_state_dict(v, device) for k, v in state["streams"].items()}
        return stats


class StatsCollector:
    """Forward pre-hooks on named ``nn.Linear`` layers that fill an :class:`ActivationStats`.

    Use as a context manager; hooks are removed on exit, even after an exception::

        with StatsCollector(model, names) as collector:
            for batch in loader:
                model(**batch)
        stats = collector.stats
    """

    def __init__(
        self,
        model: nn.Module,
        layer_names: Iterable[str],
        with_gram: bool = True,
        device: torch.device | str | None = None,
        share_inputs: bool = True,
    ) -> None:
        modules = dict(model.named_modules())
        self.layer_names = list(layer_names)
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise KeyError(f"cannot collect statistics: no module named {missing[:5]}")
        self.stats = ActivationStats()
        self.with_gram = with_gram
        self.device = device
        self.share_inputs = share_inputs
        self._modules = {n: modules[n] for n in self.layer_names}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last: tuple[torch.Tensor, str] | None = None

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            x = args[0]
            last = self._last
            same_as_last = self.share_inputs and last is not None and last[0] is x
            known = self.stats.owner.get(name)
            if same_as_last:
                key = last[1]
                if known is None:
                    self.stats.owner[name] = key
                elif known != key:
                    raise RuntimeError(
                        f"layer {name!r} shared its input with {known!r} earlier but with {key!r} now; "
                        "the model's data flow changed between calibration batches"
                    )
                return  # the tensor was already accumulated under `key`
            if known is not None and known != name:
                raise RuntimeError(
                    f"layer {name!r} shared its input with {known!r} on earlier batches but not on this one; "
                    "collect with share_inputs=False for models with data-dependent routing"
                )
            if known is None:
                self.stats.owner[name] = name
                device = self.device if self.device is not None else x.device
                self.stats.streams[name] = ChannelStats(x.shape[-1], with_gram=self.with_gram, device=device)
            self.stats.streams[name].update(x, name)
            self._last = (x, name)

        return hook

    def __enter__(self) -> StatsCollector:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable,
    forward: Callable[[nn.Module, object], object] | None = None,
    with_gram: bool = True,
    device: torch.device | str | None = None,
) -> ActivationStats:
    """Run ``forward(model, batch)`` (default ``model(batch)`` / ``model(**batch)``) over ``batches``."""

    def default_forward(m: nn.Module, batch: object) -> object:
        return m(**batch) if isinstance(batch, dict) else m(batch)

    forward = forward or default_forward
    with StatsCollector(model, layer_names, with_gram=with_gram, device=device) as collector:
        for batch in batches:
            forward(model, batch)
    n_groups = len(collector.stats.shared_groups())
    log.info(
        "collected statistics for %d layers in %d input streams (%d shared), %.1f MiB",
        len(collector.stats.owner), len(collector.stats.streams), n_groups, collector.stats.nbytes() / 2**20,
    )
    return collector.stats
