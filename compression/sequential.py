"""Block-sequential compression: one block on the device at a time, its inputs propagated block by block.

All-at-once calibration hooks every targeted layer in one pass and keeps every float64 statistic until
the end -- ``Σ_streams 8 n²`` bytes of Grams (769 MiB for SmolLM2-135M, ~44 GB for LLaMA-7B) on top of
a model that sits whole on one device.  ``calibration.mode: sequential`` keeps one block's worth:

1. capture -- one forward per calibration batch, with recorders in place of the blocks (no block runs),
   records the hidden states ``H_0[b]`` entering the first block (``calibration.activations``: on the
   block device, the host, or memory-mapped files on disk) and every block's other arguments
   (:mod:`compression.block_capture`).
2. for each block ``l`` in the layout's order: move it to ``calibration.block_device``; run it on every
   ``H_l[b]`` with statistics hooks on its targeted layers (the dense outputs ``D_l[b]`` come out of
   the same forward); reduce the statistics across processes; factorize the block's matrices at the
   allocated ranks; run the compressed block for ``C_l[b]``; set ``H_{l+1}[b] = C_l[b]``
   (``propagate: compressed`` -- later blocks calibrate on the error of the earlier ones, as in
   SVD-LLM's sequential update and GPTQ) or ``D_l[b]`` (``propagate: dense`` -- exactly the
   all-at-once statistics, hence exactly its factors); drop the statistics and move the block back.
   Each block's output error ``e_l = ‖C_l - D_l‖_F / ‖D_l‖_F`` over the calibration tokens is recorded,
   and its error relative to what the block adds to the residual stream, ``‖C_l - D_l‖_F / ‖D_l - H_l‖_F``
   (the stream itself can dwarf the update: massive activations make ``e_l`` ~1e-5 on SmolLM2).

Dense targets (``calibration.dense_targets``, with ``propagate: compressed``, ``svd_llm`` only): a second
stream ``R_l[b]`` runs the dense blocks on the dense inputs (``R_0 = H_0``).  In step 2 each batch runs first
through the dense block from ``R_l[b]`` (the targeted layers' inputs there are kept for that batch, and
the output is ``R_{l+1}[b]``), then from ``H_l[b]`` with the statistics hooks, which add each layer's cross
Gram ``(X_d - X_c)ᵀ X_c`` token for token to its Gram; :mod:`compression.whitening` turns the two into the
factors minimizing ``‖W X_d - W' X_c‖`` (the dense model's output from the compressed inputs).  Costs: one
more block forward per batch, the cross Gram GEMMs (``n²`` per token and stream, twice the Gram's upper
triangle), the cross Grams (as many bytes as the Grams) and a second set of hidden states.  Each block's
record adds ``dense_error = ‖C_l - R_{l+1}‖_F / ‖R_{l+1}‖_F``, its output's distance from the dense model's.
``calibration.target_alpha`` ``α`` moves the target only part of the way, ``X_c + α (X_d - X_c)``: the cross
Grams are scaled by ``α`` once reduced.

Peak on the block device: one block, its statistics, and every batch's hidden states
(``activations: device``) or two batches' (``host`` / ``disk``).  Statistics alive at any moment:
one block's (``L`` times less than all-at-once for ``L`` equal blocks).

Allocation.  ``uniform`` and overrides need nothing global.  A spectral allocation (``v2``, ``greedy``)
or a FLOPs budget needs every matrix's spectrum or token count before any rank is fixed: a first pass
runs steps 1-2 with dense propagation and no compression, keeps each matrix's singular values
(``min(m, n)`` float64) and token counts and frees each block's statistics; the ranks decided from
those are the all-at-once ranks; the second pass compresses at those ranks.  ``gradient`` needs every
matrix's Gram and a backward through the whole dense model: its importances are computed first, exactly as
all-at-once computes them (:func:`compression.api.dense_importances`; the Lightning stage reduces them
across processes), so its ranks are the all-at-once ranks and only the factorization runs block by block.
``calibration.output_fisher`` takes its row weights from the same dense model (one backward per gradient
batch, :func:`compression.api.dense_signals`) and weights every block's truncation by them.
That stage holds the whole model and every Gram, as all-at-once does; ``stream_weights``, which never holds
the dense model, refuses it (:class:`compression.recipe.Recipe`).

DDP: every process propagates its own calibration batches; each block's statistics (and the sums of
its output error) are reduced across processes before the block is compressed, so every process
computes the same factors.  A failure in any block puts every swapped layer back (the dense layers
are kept on the model's device until the run ends) before the error propagates.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import resource
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from typing import Any

import torch
from torch import nn

from compression.allocation import ALLOCATORS
from compression.block_capture import ActivationStore, BlockForward, LayerInputs, capture, run_block
from compression.collector import StatsCollector, default_forward
from compression.pipeline import CompressionPipeline
from compression.recipe import Recipe
from compression.report import CompressionReport
from compression.stats import CROSS, STAT_FIELDS, ActivationStats, ChannelStats, ReduceFn

log = logging.getLogger(__name__)

Observer = Callable[[str, dict], None]
"""``fn(event, info)``: ``"stats"`` (a block's reduced statistics are complete: ``block``, ``stats``) and
``"block"`` (a block is done: its record)."""


def block_paths(model: nn.Module, family: Any = None) -> list[str]:
    """The model's blocks in order, from the family: ``blocks(model)`` (a list of module paths) or the
    ``layout(model)`` (:class:`compression.layout.ModelLayout`)."""
    hook = getattr(family, "blocks", None)
    if callable(hook):
        paths = list(hook(model))
    else:
        layout_fn = getattr(family, "layout", None)
        layout = layout_fn(model) if callable(layout_fn) else None
        if layout is None:
            raise ValueError("calibration.mode: sequential needs the model's blocks: pass family= with a layout "
                             "(e.g. CausalLMSpec(model=model)) or a blocks(model) hook")
        layout.require("sequential")  # blocks that read each other's state are refused (Gemma 4's KV sharing)
        paths = [b.path for b in layout.blocks]
    if not paths:
        raise ValueError("calibration.mode: sequential: the model family lists no blocks")
    return paths


def _assign(pipe: CompressionPipeline, paths: Sequence[str]) -> list[list[str]]:
    """Matrix keys per block (model order); targets outside every block are refused."""
    keys_of: list[list[str]] = [[] for _ in paths]
    outside = []
    for key, matrix in pipe.matrices.items():
        owners = {i for name in matrix.members for i, p in enumerate(paths) if name.startswith(p + ".")}
        if len(owners) != 1:
            outside.append(key)
        else:
            keys_of[owners.pop()].append(key)
    if outside:
        raise ValueError(f"calibration.mode: sequential compresses the layers inside the model's blocks, but "
                         f"{outside[:5]} lie outside them; exclude them (exclude: [...]) or use "
                         "calibration.mode: all_at_once")
    return keys_of


def _device_of(model: nn.Module) -> torch.device:
    for p in model.parameters():
        if p.device.type != "meta":
            return p.device
    return torch.device("cpu")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:
        return None


def release_freed_memory() -> None:
    """Give the heap memory freed by the last block back to the OS.  glibc keeps freed chunks in its arenas
    (fragmented by the block's many large temporaries): measured on the TinyLlama-1.1B config, resident memory
    grew ~10-30 MiB per block without this and stays flat with it (``docs/results/sequential_depth.md``)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def peak_bytes(device: torch.device) -> int:
    """Running peak: CUDA memory allocated on ``device``, else the process's peak RSS."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


def _counts_only(stats: ActivationStats, into: ActivationStats) -> None:
    """Keep the token counts of ``stats`` (a FLOPs budget's weights) without their tensors."""
    into.owner.update(stats.owner)
    for key, s in stats.streams.items():
        kept = ChannelStats(s.n, needs=frozenset(), device="cpu")
        kept.count = s.count
        into.streams[key] = kept


class SequentialRun:
    """The driver (see the module docstring).  Built on a pipeline whose targets are selected; :meth:`run`
    fills the pipeline's statistics, allocation and truncation stages; ``records`` has one dict per block."""

    def __init__(self, pipe: CompressionPipeline, forward: Callable | None = None, reduce: ReduceFn | None = None,
                 observer: Observer | None = None, progress: bool | None = None,
                 device: torch.device | None = None, stream: Any = None) -> None:
        if pipe.method is None:
            raise ValueError("calibration.mode: sequential runs a low-rank method; the recipe has method: null")
        self.pipe, self.recipe, self.model = pipe, pipe.recipe, pipe.model
        cal = self.recipe.calibration
        self.paths = block_paths(self.model, pipe.family)
        self.keys_of = _assign(pipe, self.paths)
        self.host = _device_of(self.model)
        self.device = device or (torch.device(cal.block_device) if cal.block_device else self.host)
        self.forward = forward or getattr(pipe.family, "calibration_forward", None) or default_forward
        self.reduce, self.observer, self.stream = reduce, observer, stream  # stream: compression.streaming
        self.progress = cal.progress if progress is None else progress
        self.records: list[dict] = []

    def _notify(self, event: str, info: dict) -> None:
        if self.observer is not None:
            self.observer(event, info)

    @torch.no_grad()
    def run(self, batches: Sequence[Any], importances: dict[str, torch.Tensor] | None = None,
            fisher: dict[str, torch.Tensor] | None = None) -> list[dict]:
        """Two passes when the allocation needs every spectrum / token count first, else one.  ``fisher``: the
        dense model's output Fisher sums when ``calibration.output_fisher`` is set (required then)."""
        batches = list(batches)
        if not batches:
            raise ValueError("calibration.mode: sequential got no calibration batches")
        pipe, recipe = self.pipe, self.recipe
        if pipe.needs_importance and importances is None:
            raise ValueError(f"allocation: {recipe.allocation} in calibration.mode: sequential ranks by gradient "
                             "importances from the dense model: pass importances= (compression.api.dense_importances "
                             "computes them; compress_ and the Lightning stage do so themselves)")
        if pipe.needs_fisher:  # before the spectra pass: the spectra are taken in the weighted space
            if fisher is None:
                raise ValueError("calibration.output_fisher in calibration.mode: sequential weights every block by the "
                                 "dense model's output Fisher: pass fisher= (compression.api.dense_signals computes "
                                 "it; compress_ and the Lightning stage do so themselves)")
            pipe.set_output_fisher(fisher)
        elif fisher is not None:
            raise ValueError("fisher= given, but the recipe's calibration.output_fisher is not set")
        free = [k for k in pipe.matrices if k not in pipe.fixed]
        allocator = ALLOCATORS[recipe.allocation]
        if free and ("spectra" in allocator.needs or recipe.budget == "flops"):
            spectra: dict[str, torch.Tensor] = {}
            counts = ActivationStats()
            self._pass(batches, compress=False, spectra=spectra, counts=counts)
            pipe.defer_statistics(spectra, counts if recipe.budget == "flops" else None)
        else:
            pipe.defer_statistics()
        pipe.allocate(importances)
        try:
            self.records = self._pass(batches, compress=True)
        except BaseException:
            pipe.restore_swapped()
            raise
        pipe.block_records = self.records
        pipe.stats = None
        return self.records

    def _pass(self, batches: list, compress: bool, spectra: dict | None = None,
              counts: ActivationStats | None = None) -> list[dict]:
        pipe, cal, model, device = self.pipe, self.recipe.calibration, self.model, self.device
        store = ActivationStore(cal.activations, device)
        records = []
        from tqdm.auto import tqdm

        bar = tqdm(total=len(self.paths), desc="sequential " + ("compression" if compress else "spectra"),
                   disable=not self.progress)
        try:
            extras = capture(model, self.paths, batches, self.forward, store)
            for i, path in enumerate(self.paths):
                start = time.perf_counter()
                block = model.get_submodule(path)
                if self.stream is not None:
                    self.stream.before(i, path, block)
                block.to(device)
                dense_bytes = sum(t.nbytes for t in block.state_dict().values())
                try:
                    record = self._block(i, block, store, extras, compress, spectra, counts)
                    record["block_bytes"] = dense_bytes
                finally:
                    block.to(self.host)
                    for layer in pipe.originals():
                        layer.to(self.host)
                if self.stream is not None:
                    self.stream.after(i, path, model.get_submodule(path), write=compress)
                    pipe.drop_originals()  # on disk now: nothing to put back
                release_freed_memory()
                record.update(block=i, path=path, seconds=time.perf_counter() - start, peak_bytes=peak_bytes(device))
                records.append(record)
                bar.set_postfix(err=f"{record['output_error']:.3g}", peak=f"{record['peak_bytes'] / 2**30:.2f}GiB")
                bar.update(1)
                self._notify("block", record)
        finally:
            bar.close()
            store.close()
        return records

    def _reference(self, store: ActivationStore, b: int) -> torch.Tensor:
        """Batch ``b``'s input to the current block in the dense stream (before block 0: the one input)."""
        return store.get(("ref", b) if ("ref", b) in store.items else ("in", b), self.device)

    def _block(self, i: int, block: nn.Module, store: ActivationStore, extras: list, compress: bool,
               spectra: dict | None, counts: ActivationStats | None) -> dict:
        pipe, cal, device = self.pipe, self.recipe.calibration, self.device
        keys = self.keys_of[i]
        names = [n for k in keys for n in pipe.matrices[k].members]
        needs = pipe.stat_needs & STAT_FIELDS
        dense_stream = compress and cal.dense_targets  # every block advances it, targeted matrices or not
        if dense_stream and keys:
            needs |= {CROSS}
        want_counts = counts is not None and self.recipe.budget == "flops"
        collector = (StatsCollector(self.model, names, needs=needs, device=cal.stats_device)
                     if names and (needs or want_counts) else None)
        dense_key = "dense" if compress and keys else "in"
        if compress and keys and cal.staged:  # statistics and factors stage by stage within the block
            from compression.staged import staged_block

            return self._propagate(i, block, store, extras, staged_block(self, i, block, store, extras))
        for b in range(len(extras)):
            if dense_stream:  # first the dense stream: the layers' reference inputs, the next block's dense input
                with LayerInputs(self.model, names) as seen:
                    store.put(("ref", b), run_block(block, self._reference(store, b), extras[b][i], device))
                if collector is not None:
                    collector.reference = seen.inputs
            out: list[torch.Tensor] = []
            run = BlockForward(store.get(("in", b), device), extras[b][i], device, out)
            with collector if collector is not None else nullcontext():
                if collector is not None:
                    collector.run(block, None, run)
                else:
                    run(block, None)
            del run
            if collector is not None:
                collector.reference = None
            store.put((dense_key, b), out.pop())
        stats = collector.stats if collector is not None else None
        if stats is not None and self.reduce is not None:
            stats.reduce_(self.reduce)
        if stats is not None and dense_stream and cal.target_alpha != 1.0:  # target X_c + α (X_d - X_c)
            for stream in stats.streams.values():
                stream.cross.mul_(cal.target_alpha)
        record = {"matrices": len(keys), "stats_bytes": stats.nbytes() if stats is not None else 0,
                  "output_error": 0.0, "update_error": 0.0, "layers": 0}
        if stats is not None:
            self._notify("stats", {"block": i, "stats": stats})
        if not compress:
            if stats is not None:
                pipe.stats = stats
                if want_counts:
                    _counts_only(stats, counts)
            try:
                for key in keys:
                    if key not in pipe.fixed and "spectra" in ALLOCATORS[self.recipe.allocation].needs:
                        spectra[key] = pipe.spectrum(key)
            finally:
                pipe.stats = None
            return record
        if not keys:
            return record
        record["layers"] = len(pipe.truncate_block(keys, stats))
        del stats, collector
        return self._propagate(i, block, store, extras, record)

    def _propagate(self, i: int, block: nn.Module, store: ActivationStore, extras: list, record: dict) -> dict:
        """Run the compressed block ``i`` on its inputs, record its errors against the dense outputs
        ``("dense", b)`` (and the dense stream's ``("ref", b)``), and pass the next block's inputs on."""
        cal, device = self.recipe.calibration, self.device
        dense_stream = cal.dense_targets
        err = torch.zeros(5, dtype=torch.float64, device=device)
        for b in range(len(extras)):
            hidden = store.get(("in", b), device)
            dense = store.get(("dense", b), device)
            out = run_block(block, hidden, extras[b][i], device)
            err[0] += (out.double() - dense.double()).square().sum()
            err[1] += dense.double().square().sum()
            err[2] += (dense.double() - hidden.double()).square().sum()
            if dense_stream:
                ref = store.get(("ref", b), device)
                err[3] += (out.double() - ref.double()).square().sum()
                err[4] += ref.double().square().sum()
                del ref
            del hidden
            store.put(("in", b), out if cal.propagate == "compressed" else dense)
            store.drop(("dense", b))
        if self.reduce is not None:
            err = self.reduce(err, "sum")
        record["output_error"] = float((err[0] / err[1]).sqrt()) if err[1] > 0 else 0.0
        record["update_error"] = float((err[0] / err[2]).sqrt()) if err[2] > 0 else 0.0
        if dense_stream:
            record["dense_error"] = float((err[3] / err[4]).sqrt()) if err[4] > 0 else 0.0
        return record


def compress_sequential_(model: nn.Module, recipe: Recipe, *, family: Any = None, batches: Iterable[Any],
                         forward: Callable | None = None, reduce: ReduceFn | None = None,
                         observer: Observer | None = None, importances: dict | None = None,
                         fisher: dict | None = None, progress: bool | None = None) -> CompressionReport:
    """``compress_`` for ``calibration.mode: sequential`` (see the module docstring); the report's
    ``blocks`` lists every block's record (matrices, statistics bytes, output error, seconds, peak)."""
    pipe = CompressionPipeline(model, recipe, family)
    SequentialRun(pipe, forward, reduce, observer, progress).run(list(batches), importances, fisher)
    return pipe.finish()


def compress_streamed_(model: nn.Module, recipe: Recipe, weights: str | os.PathLike, out: str | os.PathLike, *,
                       family: Any = None, batches: Iterable[Any], forward: Callable | None = None,
                       reduce: ReduceFn | None = None, progress: bool | None = None) -> CompressionReport:
    """Block-sequential compression of a model whose weights stay on disk (:mod:`compression.streaming`):
    ``model`` built with :func:`compression.streaming.empty_parameters`, weights read from the safetensors
    in ``weights`` one block at a time, the compressed model written to ``out`` block by block
    (:func:`compression.streaming.load_streamed` reads it back)."""
    from compression.streaming import BlockStream

    if not recipe.calibration.sequential:
        raise ValueError("streamed weights need calibration.mode: sequential (one block in memory at a time)")
    stream = BlockStream.open(model, block_paths(model, family), weights, out)
    pipe = CompressionPipeline(model, recipe, family)
    SequentialRun(pipe, forward, reduce, None, progress, stream=stream).run(list(batches))
    report = pipe.finish()
    stream.finish(model, report.plan)
    return report


__all__ = [
    "SequentialRun",
    "block_paths",
    "compress_sequential_",
    "compress_streamed_",
    "peak_bytes",
]
