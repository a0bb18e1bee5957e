"""Forward pre-hooks that fill :class:`~compression.stats.ActivationStats` during calibration forwards.

:class:`StatsCollector` hooks the named ``nn.Linear`` layers; each hook hands its layer's input ``X``
(``[..., n]``) to the layer's :class:`~compression.stats.ChannelStats` accumulator (the statistics and
the cost of their GEMMs are in :mod:`compression.stats`).  :func:`collect_stats` runs it over a set of
calibration batches.

Layers that read the *same tensor* (q/k/v after the attention norm, gate/up after the
MLP norm) share one accumulator: the public SVD-LLM code keeps one Gram per layer, seven
per block, which is most of its memory.  Sharing is discovered, not assumed: during a
forward, a pre-hook that sees the very tensor object the previous hook saw joins that
hook's accumulator.  The hook holds a reference to the last tensor, so its memory cannot be
recycled for another tensor and identity is exact.

``stop_early`` ends each forward once every hooked layer has run.  A model with an output head that is not
hooked (a causal LM: ``get_output_embeddings()``) is stopped just before its head, which runs after every decoder
layer whatever the routing, so a mixture of experts whose batches reach different experts loses nothing.  Other
models learn the first batch's whole sequence of hooked calls (a module called repeatedly, e.g. VGGT's iterated
camera trunk, counts each time; that batch runs whole) and stop a later batch once it has made the same calls; a
later batch that makes as many calls, ending on the same layer, in another sequence is refused rather than cut
short.  The fallback cannot see calls a later batch would make
*beyond* that sequence, so a model without an output head whose data flow depends on the input needs
``stop_early=False``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable

import torch
from torch import nn

from compression.stats import ActivationStats, ChannelStats, check_needs

log = logging.getLogger(__name__)


class _StopForward(Exception):
    """Raised by the last hook of a batch when nothing after it is needed (``stop_early``)."""


class StatsCollector:
    """Forward pre-hooks on named ``nn.Linear`` layers that fill an :class:`ActivationStats`.

    Use as a context manager; hooks are removed on exit, even after an exception::

        with StatsCollector(model, names, needs={"gram"}) as collector:
            for batch in loader:
                collector.run(model, batch, forward)     # or forward(model, batch) directly (*)
        stats = collector.stats

    Args:
        needs: statistics to accumulate, a subset of ``{"gram", "abs"}`` (default: both, or
            ``{"abs"}`` with ``with_gram=False``); :func:`compression.methods.stats_needs` gives
            what a set of methods needs.
        with_gram: the older switch for ``"gram"``; only used when ``needs`` is not given.
        device: where accumulators live (default: each layer's device).
        share_inputs: one accumulator per distinct input tensor (see the module docstring).
        gemm_dtype: the Gram GEMM's dtype (default float32; float64 for float64 activations).
        stop_early: in :meth:`run`, end each forward once the hooked layers have run (the rest of the
            model, e.g. an LM head, is not needed): just before an unhooked output head when the model
            has one, else once a batch has made the first batch's whole sequence of hooked calls (the
            first batch runs whole to learn it; refused, an error and no silent skip, when a later batch
            makes as many calls ending on the same layer but in another sequence).

    With ``"cross"`` among ``needs`` the caller sets the attribute ``reference`` before each batch: layer
    name -> that layer's reference input on the same tokens (:meth:`ChannelStats.update`).

    (*) Non-finite inputs are an error naming the layer. On a CPU each update tests its statistics at once;
    off a CPU the test waits for the device, so it runs after each :meth:`run` batch and on leaving the
    context (:meth:`check_finite`): with forwards called directly, only at the end.
    """

    def __init__(
        self,
        model: nn.Module,
        layer_names: Iterable[str],
        with_gram: bool = True,
        device: torch.device | str | None = None,
        share_inputs: bool = True,
        needs: Iterable[str] | None = None,
        gemm_dtype: torch.dtype | None = None,
        stop_early: bool = False,
    ) -> None:
        modules = dict(model.named_modules())
        self.layer_names = list(layer_names)
        missing = [n for n in self.layer_names if n not in modules]
        if missing:
            raise KeyError(f"cannot collect statistics: no module named {missing[:5]}")
        if needs is None:
            needs = {"gram", "abs"} if with_gram else {"abs"}
        self.needs = check_needs(needs)
        self.stats = ActivationStats()
        self.device = device
        self.share_inputs = share_inputs
        self.gemm_dtype = gemm_dtype
        self.stop_early = stop_early
        self._modules = {n: modules[n] for n in self.layer_names}
        self._head = _unhooked_head(model, self._modules.values()) if stop_early else None
        self._handles: list[torch.utils.hooks.RemovableHandle] = []
        self._last: tuple[torch.Tensor, str] | None = None
        self._order: list[str] | None = None  # the first completed batch's hooked calls, in order, repeats included
        self._seen: list[str] = []  # the current batch's hooked calls
        self._deferred = False  # an update of the current batch left its finiteness test to the batch's end
        self._in_run = False
        self.reference: dict[str, torch.Tensor] | None = None  # "cross": the current batch's reference inputs

    @property
    def with_gram(self) -> bool:
        return "gram" in self.needs

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple) -> None:
            self._seen.append(name)
            self._accumulate(name, args[0])
            order = self._order
            # stop once this batch has made as many hooked calls as the whole first batch, ending on the same layer
            # (a module called repeatedly, like VGGT's camera trunk, is reached again after its first call)
            if (self._in_run and self._head is None and order is not None and name == order[-1]
                    and len(self._seen) == len(order)):
                if self._seen != order:
                    raise RuntimeError(
                        f"stop_early: layer {name!r} ended the first batch after {len(order) - 1} other hooked "
                        "calls, and this batch reached it after as many but in another sequence; the model's data "
                        "flow depends on the input, collect with stop_early=False"
                    )
                raise _StopForward

        return hook

    def _accumulate(self, name: str, x: torch.Tensor) -> None:
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
            self.stats.streams[name] = ChannelStats(x.shape[-1], needs=self.needs, device=device,
                                                    gemm_dtype=self.gemm_dtype)
        reference = self.reference.get(name) if self.reference is not None else None
        # off a CPU the finiteness test runs after the batch (run), not at each layer: a test waits for the GPU
        defer = x.device.type != "cpu"
        self._deferred |= defer
        self.stats.streams[name].update(x, name, reference, defer_check=defer)
        self._last = (x, name)

    def run(self, model: nn.Module, batch: object,
            forward: Callable[[nn.Module, object], object] | None = None) -> None:
        """One calibration forward, ``forward(model, batch)`` (default ``model(**batch)`` / ``model(batch)``),
        ended after the last needed layer when ``stop_early`` (see the class docstring)."""
        forward = forward or default_forward
        self._seen = []
        self._in_run = self.stop_early
        try:
            forward(model, batch)
        except _StopForward:
            pass
        finally:
            self._in_run = False
            self._last = None  # the next batch's tensors are new objects
        if self.stop_early and self._order is None and self._seen:
            self._order = list(self._seen)
        self.check_finite()

    def check_finite(self) -> None:
        """Test the statistics whose updates left their finiteness test for later (off a CPU) and raise,
        naming the first layer whose input was non-finite. :meth:`run` calls it after each batch (on a GPU:
        one test and one wait per batch, not one per layer), and leaving the context calls it (forwards
        called directly)."""
        if self._deferred:
            self._deferred = False
            ChannelStats.check_deferred(self.stats.streams)

    def _stop_at_head(self, module: nn.Module, args: tuple) -> None:
        if self._in_run:
            raise _StopForward

    def __enter__(self) -> StatsCollector:
        for name, module in self._modules.items():
            self._handles.append(module.register_forward_pre_hook(self._hook(name)))
        if self._head is not None:
            self._handles.append(self._head.register_forward_pre_hook(self._stop_at_head))
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.remove()
        if exc_type is None:
            self.check_finite()

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._last = None


def _unhooked_head(model: nn.Module, hooked) -> nn.Module | None:
    """The model's output head (``get_output_embeddings()``) when neither it nor a module inside it is hooked: the
    point every hooked layer of a causal LM has run by, whichever experts a batch reaches."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, nn.Module):
        return None
    inside = {id(m) for m in head.modules()}
    return None if any(id(m) in inside for m in hooked) else head


def default_forward(m: nn.Module, batch: object) -> object:
    """``m(**batch)`` for a dict batch, else ``m(batch)``: the calibration forward when none is given."""
    return m(**batch) if isinstance(batch, dict) else m(batch)


@torch.no_grad()
def collect_stats(
    model: nn.Module,
    layer_names: Iterable[str],
    batches: Iterable,
    forward: Callable[[nn.Module, object], object] | None = None,
    with_gram: bool = True,
    device: torch.device | str | None = None,
    needs: Iterable[str] | None = None,
    gemm_dtype: torch.dtype | None = None,
    stop_early: bool = True,
) -> ActivationStats:
    """Run ``forward(model, batch)`` (default ``model(batch)`` / ``model(**batch)``) over ``batches``.

    ``needs`` / ``with_gram`` / ``gemm_dtype`` / ``stop_early``: see :class:`StatsCollector`.
    """
    with StatsCollector(model, layer_names, with_gram=with_gram, device=device, needs=needs,
                        gemm_dtype=gemm_dtype, stop_early=stop_early) as collector:
        for batch in batches:
            collector.run(model, batch, forward)
    n_groups = len(collector.stats.shared_groups())
    log.info(
        "collected %s for %d layers in %d input streams (%d shared), %.1f MiB",
        "/".join(sorted(collector.needs)) or "token counts", len(collector.stats.owner),
        len(collector.stats.streams), n_groups, collector.stats.nbytes() / 2**20,
    )
    return collector.stats
