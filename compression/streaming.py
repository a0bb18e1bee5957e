"""Streamed weights: a model larger than host memory compressed and written out one block at a time.

The model is built with :func:`empty_parameters` (every parameter on the ``meta`` device: no memory, no
initialization; buffers such as rotary tables are real).  :class:`ShardedWeights` reads tensors by name
from safetensors files (``model.safetensors`` or the shards of ``model.safetensors.index.json``, as
``save_pretrained`` writes them), memory-mapped, one module at a time.  :class:`BlockStream` plugs into
the block-sequential driver (:class:`compression.sequential.SequentialRun`): before a block runs it is
materialized from the shards, after it is compressed its state is written to ``out/block-NNNNN.safetensors``
and its parameters go back to ``meta``, so host memory holds the non-block weights (embeddings, final
norm, head), one block, its statistics and the calibration hidden states, whatever the depth.
:meth:`BlockStream.finish` writes the non-block weights, an index and the plan: :func:`load_streamed`
rebuilds the compressed model from the folder (plan first, then every tensor by name).

A streamed run cannot put a failed block's predecessors back (they are on disk, not in memory): the
output folder is complete only when :meth:`BlockStream.finish` ran.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from compression.finite import all_finite

INDEX = "model.safetensors.index.json"
PLAN = "compression_plan.json"


@contextmanager
def empty_parameters() -> Iterator[None]:
    """Modules built inside get their parameters on the ``meta`` device (buffers stay real)."""
    register = nn.Module.register_parameter

    def meta_register(self: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(self, name, param)
        if param is not None and param.device.type != "meta":
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = meta_register
    try:
        yield
    finally:
        nn.Module.register_parameter = register


class ShardedWeights:
    """Tensors by full name from ``folder``'s safetensors file(s), read on demand (memory-mapped)."""

    def __init__(self, folder: str | os.PathLike, files: dict[str, str] | None = None) -> None:
        from safetensors import safe_open

        self.folder = Path(folder)
        index = self.folder / INDEX
        if files is not None:  # tensor name -> file name in ``folder`` (what a BlockStream wrote so far)
            self.files = {k: self.folder / v for k, v in files.items()}
        elif index.is_file():
            self.files = {k: self.folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        elif (self.folder / "model.safetensors").is_file():
            with safe_open(self.folder / "model.safetensors", "pt") as f:
                self.files = dict.fromkeys(f.keys(), self.folder / "model.safetensors")
        else:
            raise FileNotFoundError(f"{self.folder}: no {INDEX} or model.safetensors to stream weights from")

    def span(self, name: str) -> tuple[Path, str, int, int]:
        """``(file, safetensors dtype, first byte, end byte)`` of tensor ``name`` in its file (from the header)."""
        path = self.files[name]
        with open(path, "rb") as f:
            size = int.from_bytes(f.read(8), "little")
            entry = json.loads(f.read(size))[name]
        start, end = entry["data_offsets"]
        return path, entry["dtype"], 8 + size + start, 8 + size + end

    def read(self, name: str) -> torch.Tensor:
        from safetensors import safe_open

        if name not in self.files:
            raise KeyError(f"{self.folder}: no tensor {name!r} in the safetensors files")
        with safe_open(self.files[name], "pt") as f:
            return f.get_tensor(name)

    @torch.no_grad()
    def load(self, module: nn.Module, prefix: str = "", skip: tuple[str, ...] = ()) -> int:
        """Materialize every ``meta`` parameter / persistent buffer of ``module`` (full names ``prefix + name``)
        whose name does not start with one of ``skip``, in the dtype the module was built with (as
        ``from_pretrained(dtype=...)``: a copy when the file stores another dtype, else memory-mapped);
        returns the bytes read."""
        state, read = {}, 0
        persistent = {f"{n}.{b}" if n else b for n, m in module.named_modules() for b in m._buffers
                      if b not in m._non_persistent_buffers_set}
        tensors = [*module.named_parameters(), *((n, b) for n, b in module.named_buffers() if n in persistent)]
        for name, tensor in tensors:
            full = prefix + name
            if tensor.device.type != "meta" or any(full == s or full.startswith(s + ".") for s in skip):
                continue
            value = self.read(full)
            if value.shape != tensor.shape:
                raise ValueError(f"{self.folder}: tensor {full!r} has shape {tuple(value.shape)}, the model expects "
                                 f"{tuple(tensor.shape)}")
            if value.dtype != tensor.dtype and value.is_floating_point() and tensor.is_floating_point():
                value = value.to(tensor.dtype)
            state[name] = value
            read += value.nbytes
        module.load_state_dict(state, strict=False, assign=True)
        return read


def _save(state: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(path))


_ST_DTYPES = {torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
              torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
              torch.bool: "BOOL"}
CHUNK = 16 * 2**20


def _save_copying(state: dict[str, torch.Tensor], path: Path, weights: ShardedWeights) -> None:
    """``state`` as one safetensors file, each tensor that ``weights`` holds in the same dtype copied from its
    file with plain reads, ``CHUNK`` bytes at a time.  Reading the model's own memory-mapped tensor would page
    the whole of it into this process (an embedding and a head: 500 MiB at TinyLlama's width); the copy
    holds one chunk.  The caller guarantees those tensors are unchanged since they were loaded."""
    sources, header, offset = {}, {}, 0
    for name, tensor in state.items():
        dtype = _ST_DTYPES[tensor.dtype]
        if name in weights.files:
            src, src_dtype, start, end = weights.span(name)
            if src_dtype == dtype and end - start == tensor.nbytes:
                sources[name] = (src, start, end)
        header[name] = {"dtype": dtype, "shape": list(tensor.shape), "data_offsets": [offset, offset + tensor.nbytes]}
        offset += tensor.nbytes
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for name, tensor in state.items():
            if name in sources:
                src, start, end = sources[name]
                with open(src, "rb") as g:
                    g.seek(start)
                    for at in range(start, end, CHUNK):
                        f.write(g.read(min(CHUNK, end - at)))
            else:
                flat = tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                for at in range(0, flat.numel(), CHUNK):
                    f.write(flat[at:at + CHUNK].numpy().tobytes())
    os.replace(tmp, path)


class BlockStream:
    """Materialize each block from ``weights`` before it runs; write it to ``out`` and free it after."""

    def __init__(self, weights: ShardedWeights, out: str | os.PathLike) -> None:
        self.weights, self.out = weights, Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.weight_map: dict[str, str] = {}

    @classmethod
    def open(cls, model: nn.Module, blocks: list[str], weights: str | os.PathLike,
             out: str | os.PathLike) -> BlockStream:
        """Load the non-block tensors of ``model`` (built with :func:`empty_parameters`) from ``weights``,
        tie them, and return the stream of its ``blocks`` (module paths) into ``out``."""
        shards = ShardedWeights(weights)
        shards.load(model, skip=tuple(blocks))
        if hasattr(model, "tie_weights"):
            model.tie_weights()
        return cls(shards, out)

    def before(self, index: int, path: str, block: nn.Module) -> None:
        self.weights.load(block, prefix=path + ".")
        for name, p in block.named_parameters():
            if not all_finite(p):
                raise FloatingPointError(f"weight {path}.{name} (streamed from {self.weights.folder}) contains NaN/inf")

    def after(self, index: int, path: str, block: nn.Module, write: bool) -> None:
        if write:
            name = f"block-{index:05d}.safetensors"
            state = {f"{path}.{k}": v for k, v in block.state_dict().items()}
            _save(state, self.out / name)
            self.weight_map.update(dict.fromkeys(state, name))
        block.to("meta")

    def reload(self, model: nn.Module) -> int:
        """Fill the blocks of ``model`` back from the files written (memory-mapped: the compressed model is
        whole again, its block tensors backed by those files); returns the bytes mapped."""
        return ShardedWeights(self.out, files=self.weight_map).load(model)

    def finish(self, model: nn.Module, plan: dict) -> None:
        """The non-block tensors (tied ones once), the index and the plan.  The sequential driver compresses
        nothing outside the blocks, so the non-block tensors are the ones loaded: copied from their files."""
        from compression.plan import save_plan

        seen, rest = set(), {}
        for name, tensor in model.state_dict(keep_vars=True).items():
            if name in self.weight_map or tensor.device.type == "meta" or id(tensor) in seen:
                continue
            seen.add(id(tensor))
            rest[name] = tensor
        _save_copying(rest, self.out / "rest.safetensors", self.weights)
        self.weight_map.update(dict.fromkeys(rest, "rest.safetensors"))
        (self.out / INDEX).write_text(json.dumps({"metadata": {}, "weight_map": self.weight_map}, indent=1))
        save_plan(plan, self.out / PLAN)


def load_streamed(model: nn.Module, folder: str | os.PathLike) -> nn.Module:
    """Rebuild a model written by a streamed run: ``model`` (dense, built with :func:`empty_parameters`)
    gets the plan's factored structure, then every tensor from the folder."""
    from compression.plan import apply_plan, load_plan

    real = [n for n, p in model.named_parameters() if p.device.type != "meta"]
    if real:
        raise ValueError(f"load_streamed fills a model built with empty_parameters(); {real[:3]} are not on meta")
    apply_plan(model, load_plan(Path(folder) / PLAN))
    ShardedWeights(folder).load(model)
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    return model


__all__ = ["BlockStream", "ShardedWeights", "empty_parameters", "load_streamed"]
