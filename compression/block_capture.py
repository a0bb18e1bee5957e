"""Each block's inputs, captured once and replayed block by block (:mod:`compression.sequential`).

:func:`capture` runs every calibration batch ``b`` through the model with each block replaced by a
recorder: the first block's input, the hidden states ``H_0[b]`` (the block's input tensor, e.g.
``batch x tokens x width``), goes to an :class:`ActivationStore`; every block's other arguments (attention
mask, position embeddings, position ids: kept per block, since some families give each layer type its own
mask) are returned as ``extras[b][l] = (positional, args, kwargs)``.  The recorders pass the hidden states
on unchanged and the last one stops the forward, so no block and no output head runs.  :func:`run_block`
then runs block ``l`` on any ``H_l[b]`` with those arguments, as the model would have called it (hidden
states first, or as ``hidden_states=``).

The store keeps the hidden states on the block device, on the host, or in memory-mapped files on disk
(``calibration.activations``: ``device`` / ``host`` / ``disk``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn

from compression.io import safe_torch_load
from compression.plan import set_submodule


class _Stop(Exception):
    """Raised by the last block's recorder: nothing after the blocks' inputs is needed."""


def to_device(obj: Any, device: torch.device) -> Any:
    """Every tensor in ``obj`` (nested tuples, lists, dicts) moved to ``device``."""
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, tuple | list):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


class ActivationStore:
    """Hidden states by key, kept on ``device``, on the host, or in memory-mapped files (``disk``)."""

    def __init__(self, where: str, device: torch.device) -> None:
        self.where, self.device = where, device
        self.items: dict[Any, Any] = {}
        self.dir = tempfile.mkdtemp(prefix="svd-sequential-") if where == "disk" else None
        self._files = 0

    def put(self, key: Any, value: torch.Tensor) -> None:
        self.drop(key)
        if self.where == "disk":
            path = os.path.join(self.dir, f"{self._files}.pt")
            self._files += 1
            torch.save(value.detach().cpu().contiguous(), path)
            self.items[key] = path
        else:
            self.items[key] = value.detach().to(self.device if self.where == "device" else "cpu")

    def get(self, key: Any, device: torch.device) -> torch.Tensor:
        value = self.items[key]
        if isinstance(value, str):
            value = safe_torch_load(value, mmap=True)
        return value.to(device)

    def drop(self, key: Any) -> None:
        old = self.items.pop(key, None)
        if isinstance(old, str):
            os.unlink(old)  # a tensor still mapped from it stays readable (POSIX)

    def nbytes(self) -> int:
        return sum(v.nbytes for v in self.items.values() if isinstance(v, torch.Tensor))

    def close(self) -> None:
        self.items.clear()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)


class _Recorder(nn.Module):
    """Stands in for block ``index`` during the capture: records its arguments, passes its input on."""

    def __init__(self, block: nn.Module, index: int, sink: Callable, last: bool) -> None:
        super().__init__()
        object.__setattr__(self, "_block", block)  # not a submodule: the capture moves nothing
        self._index, self._sink, self._last = index, sink, last

    def __getattr__(self, name: str) -> Any:  # the model may read a block attribute (e.g. its layer type)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_block"), name)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if args:
            hidden, extra = args[0], (True, args[1:], kwargs)
        elif "hidden_states" in kwargs:
            kwargs = dict(kwargs)
            hidden, extra = kwargs.pop("hidden_states"), (False, (), kwargs)
        else:
            raise RuntimeError("calibration.mode: sequential: a block was called without its hidden states "
                               "(no positional argument, no hidden_states=)")
        self._sink(self._index, hidden, extra)
        if self._last:
            raise _Stop
        return hidden


def capture(model: nn.Module, paths: Sequence[str], batches: Iterable[Any], forward: Callable,
            store: ActivationStore) -> list[list[tuple]]:
    """Store ``("in", b)``: the first block's input for batch ``b``; return every block's other
    arguments per batch, ``extras[b][l] = (positional, args, kwargs)``."""
    blocks = [model.get_submodule(p) for p in paths]
    extras: list[list[tuple]] = []
    current: dict[int, tuple] = {}

    def sink(index: int, hidden: torch.Tensor, extra: tuple) -> None:
        if index == 0:
            store.put(("in", len(extras)), hidden)
        current[index] = extra

    for i, path in enumerate(paths):
        set_submodule(model, path, _Recorder(blocks[i], i, sink, i == len(paths) - 1))
    try:
        for batch in batches:
            current.clear()
            try:
                forward(model, batch)
            except _Stop:
                pass
            if len(current) != len(paths):
                raise RuntimeError(f"calibration.mode: sequential: the calibration forward reached "
                                   f"{len(current)} of the {len(paths)} blocks in order")
            extras.append([current[i] for i in range(len(paths))])
    finally:
        for path, block in zip(paths, blocks):
            set_submodule(model, path, block)
    return extras


def run_block(block: nn.Module, hidden: torch.Tensor, extra: tuple, device: torch.device) -> torch.Tensor:
    """``block`` on one batch's hidden states with the arguments :func:`capture` kept (``extra``), on
    ``device``; the block's output hidden states."""
    positional, args, kwargs = extra
    args, kwargs = to_device(args, device), to_device(kwargs, device)
    out = block(hidden, *args, **kwargs) if positional else block(*args, hidden_states=hidden, **kwargs)
    return out[0] if isinstance(out, tuple | list) else out


class BlockForward:
    """``fn(block, _)`` for :meth:`StatsCollector.run`: one batch through a block, its output appended to ``out``."""

    def __init__(self, hidden: torch.Tensor, extra: tuple, device: torch.device, out: list) -> None:
        self.hidden, self.extra, self.device, self.out = hidden, extra, device, out

    def __call__(self, block: nn.Module, _: Any) -> None:
        self.out.append(run_block(block, self.hidden, self.extra, self.device))


class LayerInputs:
    """Forward pre-hooks keeping the last input of each named layer (``inputs[name]``) while active."""

    def __init__(self, model: nn.Module, names: Sequence[str]) -> None:
        self.modules = {n: model.get_submodule(n) for n in names}
        self.inputs: dict[str, torch.Tensor] = {}
        self.handles: list = []

    def __enter__(self) -> LayerInputs:
        for name, module in self.modules.items():
            self.handles.append(module.register_forward_pre_hook(
                lambda _m, args, name=name: self.inputs.__setitem__(name, args[0])))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()


def layer_calls(model: nn.Module, names: Mapping[str, str], run: Callable[[nn.Module], Any]) -> list[tuple[str, Any]]:
    """``(label, input)`` of every call of the layers ``names`` (module path in ``model`` -> label) during
    ``run(model)`` under ``no_grad``, in call order; the inputs are held, so tensor identities stay unique."""
    calls: list[tuple[str, Any]] = []
    handles = [model.get_submodule(path).register_forward_pre_hook(
        lambda _m, args, label=label: calls.append((label, args[0]))) for path, label in names.items()]
    try:
        with torch.no_grad():
            run(model)
    finally:
        for handle in handles:
            handle.remove()
    return calls


def group_by_input(calls: Sequence[tuple[str, Any]]) -> list[list[str]]:
    """Labels grouped by the very tensor their first call read (identity), groups in order of first call."""
    groups: list[tuple[Any, list[str]]] = []
    first: set[str] = set()
    for label, x in calls:
        if label in first:
            continue
        first.add(label)
        for tensor, members in groups:
            if tensor is x:
                members.append(label)
                break
        else:
            groups.append((x, [label]))
    return [members for _, members in groups]


__all__ = [
    "ActivationStore",
    "BlockForward",
    "LayerInputs",
    "capture",
    "group_by_input",
    "layer_calls",
    "run_block",
    "to_device",
]
