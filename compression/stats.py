"""Activation statistics of ``nn.Linear`` inputs (collected by the forward pre-hooks of :mod:`compression.collector`).

For an input stream ``X`` (all calibration tokens stacked, ``N x n``) one accumulator keeps

    gram     = XᵀX              (n x n, float64)   -- whitening (SVD-LLM, SVD-LLM V2): need "gram"
    count    = N                (tokens seen)
    abs_sum  = Σ_t |x_t|        (n, float64)       -- ASVD abs-mean scaling:           need "abs"
    abs_max  = max_t |x_t|      (n, float64)       -- ASVD abs-max scaling:            need "abs"
    cross    = (R - X)ᵀX        (n x n, float64)   -- dense targets (sequential mode):  need "cross"

``cross`` pairs every token with a reference input ``r_t`` of the same layer (``R``, N x n: what the
layer sees in the dense model on the same token, passed to :meth:`ChannelStats.update`), so that
``RᵀX = gram + cross``; it is accumulated as the difference, which is exactly zero when ``R = X``
(:mod:`compression.sequential`, ``calibration.dense_targets``).

Only what some configured method needs is accumulated: ``needs`` is a subset of
``{"gram", "abs"}`` (the union of :attr:`compression.methods.Method.needs` over the methods
that will run; :func:`compression.methods.stats_needs`), plus ``"cross"``, asked for by the
sequential mode only.

Cost and precision of the Gram.  Each batch ``X_b`` (``N_b x n``) is multiplied in a GEMM of
``gemm_dtype`` and added to a float64 running sum, ``G = Σ_b fl(X_bᵀ X_b)``:

- ``float32`` (default for float32 / bfloat16 / float16 inputs): twice the float64 GEMM rate on
  a CPU, 30-60x on consumer GPUs.  Per batch the error is the GEMM's
  ``|fl(X_bᵀX_b) - X_bᵀX_b| <= γ_K |X_b|ᵀ|X_b|`` with ``γ_K ≈ K · 2⁻²⁴`` for the blocked
  accumulation length ``K <= N_b``; across batches the float64 sum adds nothing visible.
  In relative terms (≈1e-7 · ‖G‖) this sits far below the jitter the whitening methods add
  for conditioning (``svd_llm``: ≥ 1e-8 · mean diag, and eigenvalues under ``eig_rtol`` are dropped).
- ``float64`` (default for float64 inputs; or asked for): exact up to float64 rounding, the
  reference the whitening theorems are tested with.
- ``bfloat16`` (CUDA only): bf16 inputs, float32 accumulation and output (``out_dtype``).

The Gram is symmetric, so only its upper block triangle is computed: the ``n`` channels are
cut into ``k = ceil(n / GRAM_BLOCK)`` column blocks and block ``j`` multiplies ``[X_1 ... X_j]ᵀ X_j``
(``(k+1)/(2k)`` of the full product's FLOPs for ``k`` blocks).  On 2 CPU cores these tall products ran at 173-181
GFLOP/s on random data against 148-160 for the same blocks taken as rows, ``X_jᵀ [X_j ... X_last]``, but inside a
SmolLM2 calibration, on activations still warm from the forward, the Gram updates took only about 2 % less time
(3.12-3.16 s against 3.15-3.48 s, 6 alternating rounds; bit-identical Grams).  The lower triangle is mirrored
when :attr:`ChannelStats.gram` is read.  Off a CPU, where a block costs a launch more than its FLOPs, the blocks
are up to 2048 channels wide (``GRAM_BLOCK_ACCELERATOR``): one full product up to that width.  Float32 GEMMs
run as full float32 even where the process allows TF32 or bfloat16 matmuls (:func:`ieee_float32_matmul`).
Input activations are never copied to float64: the
GEMM reads them in place (one cast only for float16 / bfloat16 on a CPU), and the
non-finite check reads the Gram's diagonal (``Σ_t x_tj²`` is NaN/inf iff some ``x_tj`` is, up to
float32 overflow of squares above ~1.8e19, reported the same way) or the abs sums, not the
``N x n`` activations.

Layers that read the *same tensor* share one accumulator (:mod:`compression.collector`).

Everything is a sum (or a max), so accumulators from several processes combine exactly:
:meth:`ActivationStats.reduce_` takes any ``fn(tensor, op)`` (e.g. an all-reduce).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Hashable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch

from compression.finite import all_finite

T = TypeVar("T")

ReduceFn = Callable[[torch.Tensor, str], torch.Tensor]
"""``fn(tensor, op)`` with ``op`` in ``{"sum", "max"}``; returns the reduced tensor."""

STAT_FIELDS = frozenset({"gram", "abs"})
"""What a method can need: ``"gram"`` (``XᵀX``) and ``"abs"`` (per-channel abs-sum and abs-max)."""

CROSS = "cross"
"""The dense-target cross Gram ``(R - X)ᵀX`` (module docstring); asked for by the sequential mode only."""

GRAM_BLOCK = 256
"""Largest column block of the upper-triangle Gram update on a CPU (see the module docstring): ``n`` is cut
into ``k = ceil(n / 256)`` equal blocks.  Measured on 2 CPU cores, 1024 tokens, float32: 576
channels 9.0 ms full product -> 6.3 ms in 3 blocks; 1536 channels 155 ms -> 38 ms in 6 blocks."""

GRAM_BLOCK_ACCELERATOR = 2048
"""The same off a CPU (a GPU): up to 2048 channels the Gram is one full product.  There each block costs a
launch and its Python dispatch while the FLOPs are cheap; on an H200, SmolLM2's 576-channel updates in three
blocks made calibration 2x slower than the naive one-GEMM hook (``docs/results/gpu``)."""

_MIRROR_LOCK = threading.Lock()

GEMM_ROWS = 8192
"""Tokens per Gram GEMM: bounds the float32 accumulation length and any cast's workspace."""


def check_needs(needs: Iterable[str]) -> frozenset[str]:
    """``needs`` as a frozenset, refusing names other than ``"gram"`` / ``"abs"``."""
    out = frozenset(needs)
    unknown = sorted(out - STAT_FIELDS - {CROSS})
    if unknown:
        raise ValueError(f"unknown statistics {unknown}; choose from {sorted(STAT_FIELDS | {CROSS})}")
    return out


def gemm_dtype_for(x_dtype: torch.dtype, device: torch.device, gemm_dtype: torch.dtype | None) -> torch.dtype:
    """The Gram GEMM's dtype: ``gemm_dtype``, or float32 (float64 for float64 inputs) when ``None``."""
    if gemm_dtype is None:
        return torch.float64 if x_dtype == torch.float64 else torch.float32
    if gemm_dtype not in (torch.float32, torch.float64, torch.bfloat16):
        raise ValueError(f"gram GEMM dtype must be float32, float64 or bfloat16, got {gemm_dtype}")
    if gemm_dtype == torch.bfloat16 and device.type != "cuda":
        raise ValueError("bfloat16 Gram GEMMs need a CUDA device (float32 output); on a CPU use float32")
    return gemm_dtype


@dataclass
class ChannelStats:
    """Running statistics of one input stream with ``n`` channels (see module docstring).

    ``needs``: the fields to accumulate (subset of ``{"gram", "abs", "cross"}``); the others stay ``None``.
    ``gemm_dtype``: the Gram GEMM's dtype (``None``: float32, or float64 for float64 inputs).
    """

    n: int
    needs: frozenset[str] = STAT_FIELDS
    device: torch.device | str = "cpu"
    gemm_dtype: torch.dtype | None = None
    count: int = 0
    abs_sum: torch.Tensor | None = field(init=False, default=None)
    abs_max: torch.Tensor | None = field(init=False, default=None)
    cross: torch.Tensor | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.needs = check_needs(self.needs)
        self._gram: torch.Tensor | None = None
        self._mirrored = True  # the lower triangle of _gram is up to date
        self._shared: _SharedReads | None = None  # set by shared_reads() for one pass over the layers
        if "abs" in self.needs:
            self.abs_sum = torch.zeros(self.n, dtype=torch.float64, device=self.device)
            self.abs_max = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        if "gram" in self.needs:
            self._gram = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)
        if CROSS in self.needs:
            self.cross = torch.zeros(self.n, self.n, dtype=torch.float64, device=self.device)

    def _held_device(self) -> torch.device | None:
        """Where the accumulated fields live (``None`` before any is allocated)."""
        return next((t.device for t in (self._gram, self.abs_sum, self.cross) if t is not None), None)

    # -- the Gram, stored as its upper block triangle while accumulating ---------------------------
    @property
    def gram(self) -> torch.Tensor | None:
        """``XᵀX`` (n x n, float64, symmetric), or ``None`` when not collected."""
        if self._gram is not None and not self._mirrored:
            with _MIRROR_LOCK:  # q/k/v share one stream and may be decomposed in parallel threads
                if not self._mirrored:
                    upper = torch.triu(self._gram)
                    self._gram.copy_(upper + torch.triu(self._gram, 1).T)
                    self._mirrored = True
        return self._gram

    @gram.setter
    def gram(self, value: torch.Tensor | None) -> None:
        self._gram, self._mirrored = value, True

    @torch.no_grad()
    def update(self, x: torch.Tensor, name: str = "?", reference: torch.Tensor | None = None,
               defer_check: bool = False) -> None:
        """Add the tokens of ``x [..., n]`` (and, for ``"cross"``, the same tokens' ``reference`` inputs);
        non-finite activations are an error naming the layer.

        ``defer_check``: no finiteness test here; the caller runs :meth:`check_deferred` later. A non-finite
        input leaves every sum it reaches non-finite for good (sums and maxima keep an inf or NaN), so one
        test of the accumulated fields after many updates finds what a test after each would have. On a GPU
        each test here would wait for the device and launch its own small kernels (``StatsCollector``
        defers off a CPU and tests all streams once per batch)."""
        if x.shape[-1] != self.n:
            raise ValueError(f"{name}: input has {x.shape[-1]} channels, statistics expect {self.n}")
        x = x.detach().reshape(-1, self.n)  # a view for the usual contiguous activations
        device = self._held_device()
        if device is not None and x.device != device:
            x = x.to(device)
        if self._gram is not None or self.cross is not None:
            dtype = gemm_dtype_for(x.dtype, x.device, self.gemm_dtype)
            with ieee_float32_matmul():
                if self._gram is not None:
                    for lo in range(0, x.shape[0], GEMM_ROWS):
                        self._add_gram(x[lo:lo + GEMM_ROWS] if x.shape[0] > GEMM_ROWS else x, dtype)
                if self.cross is not None:
                    self._add_cross(x, reference, name, dtype)
        if self.abs_sum is not None:
            # the sum runs in float64 (exact abs-mean); the max is exact in any dtype
            ax = x.abs()
            self.abs_sum += ax.sum(0, dtype=torch.float64)
            torch.maximum(self.abs_max, ax.amax(0).to(torch.float64), out=self.abs_max)
            del ax
        if not defer_check and not self._all_finite():
            raise self._nonfinite(name)
        self.count += x.shape[0]

    def derived(self, key: Hashable, compute: Callable[[], T]) -> T:
        """``compute()``: something derived from these statistics alone (a whitening factor of the Gram), for
        ``key``.  Inside :func:`shared_reads` it is computed once for the layers that read this stream and let go
        after the last of them; elsewhere it is computed on every call and nothing is kept."""
        shared = self._shared
        return compute() if shared is None else shared.get(key, compute)

    @staticmethod
    def _nonfinite(name: str) -> FloatingPointError:
        return FloatingPointError(
            f"non-finite activation entering layer {name!r} during calibration; "
            "check the model's dtype (use float32/bfloat16, not float16 overflow) and the inputs"
        )

    def _finiteness_parts(self) -> list[torch.Tensor]:
        """1-D tensors that are all finite exactly when every accumulated field is: the Gram's diagonal (sums
        of squares), the abs sums, and the cross Gram's largest magnitude (a max keeps a NaN, a sum could
        overflow)."""
        parts = [t for t in (self._gram.diagonal() if self._gram is not None else None, self.abs_sum)
                 if t is not None]
        if self.cross is not None:
            parts.append(self.cross.abs().amax().reshape(1))
        return parts

    def _all_finite(self) -> bool:
        return all(all_finite(part) for part in self._finiteness_parts())

    @staticmethod
    def check_deferred(streams: dict[str, ChannelStats]) -> None:
        """Raise, naming the first such layer in ``streams``' order (name -> statistics, in the order the layers
        first ran), when an accumulated field of one of them is non-finite. One concatenation and one
        read per device for all of them: on a GPU, one wait."""
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for st in streams.values():
            for part in st._finiteness_parts():
                by_device.setdefault(part.device, []).append(part)
        if all(all_finite(torch.cat(parts)) for parts in by_device.values()):
            return
        for name, st in streams.items():  # the error path: which layer
            if not st._all_finite():
                raise ChannelStats._nonfinite(name)

    def _add_gram(self, x: torch.Tensor, dtype: torch.dtype) -> None:
        """``_gram[:j + w, j:j + w] += fl(x[:, :j + w]ᵀ x_j)`` for the column blocks ``x_j`` of width ``w`` (one
        full product when the device's block width covers ``n``).  ``add_`` on the block's view: ``view += ...``
        would copy it back."""
        x, mm = _gemm(x, dtype)
        blocks = -(-self.n // (GRAM_BLOCK if x.device.type == "cpu" else GRAM_BLOCK_ACCELERATOR))
        if blocks == 1:
            self._gram.add_(mm(x.T, x))
            return
        step = -(-self.n // blocks)
        for j in range(0, self.n, step):  # block column j: rows 0 .. j + step, the tall product the GEMM runs fastest
            self._gram[:j + step, j:j + step].add_(mm(x[:, :j + step].T, x[:, j:j + step]))
        self._mirrored = False

    def _add_cross(self, x: torch.Tensor, reference: torch.Tensor | None, name: str, dtype: torch.dtype) -> None:
        """``cross += fl((r - x)ᵀ x)`` over the tokens of ``x`` and their ``reference`` inputs ``r``."""
        if reference is None:
            raise ValueError(f"{name}: the dense-target cross Gram needs each token's reference input (the layer's "
                             "input in the dense model); none was given")
        r = reference.detach().reshape(-1, reference.shape[-1]).to(x.device)
        if r.shape != x.shape:
            raise ValueError(f"{name}: reference input has shape {tuple(r.shape)}, the input {tuple(x.shape)}; "
                             "the two runs must see the same tokens")
        for lo in range(0, x.shape[0], GEMM_ROWS):
            diff, _ = _gemm(r[lo:lo + GEMM_ROWS] - x[lo:lo + GEMM_ROWS], dtype)  # exactly 0 where r_t = x_t
            xc, mm = _gemm(x[lo:lo + GEMM_ROWS], dtype)
            self.cross.add_(mm(diff.T, xc))

    def _require_abs(self) -> None:
        if self.abs_sum is None:
            raise ValueError("abs-mean / abs-max statistics were not collected; collect with needs "
                             "including 'abs' (what asvd needs)")

    @property
    def abs_mean(self) -> torch.Tensor:
        """Per-channel ``mean_t |x_t|`` (n,)."""
        self._require_abs()
        return self.abs_sum / max(self.count, 1)

    def reduce_(self, fn: ReduceFn) -> None:
        """Combine with the same accumulator on other processes (sums and max)."""
        device = self._held_device() or self.device
        counts = fn(torch.tensor([float(self.count)], dtype=torch.float64, device=device), "sum")
        self.count = int(round(counts.item()))
        if self.abs_sum is not None:
            self.abs_sum = fn(self.abs_sum, "sum")
            self.abs_max = fn(self.abs_max, "max")
        if self._gram is not None:
            self.gram = fn(self.gram, "sum")
        if self.cross is not None:
            self.cross = fn(self.cross, "sum")

    def check_finite(self, name: str) -> None:
        """Raise naming the layer and field when any statistic is NaN/inf."""
        fields = {"abs_sum": self.abs_sum, "abs_max": self.abs_max, "gram": self.gram, "cross": self.cross}
        for key, value in fields.items():
            if value is not None and not all_finite(value):
                raise FloatingPointError(f"statistics for layer {name!r}: field {key!r} contains NaN/inf")

    def nbytes(self) -> int:
        return sum(t.nbytes for t in (self.abs_sum, self.abs_max, self._gram, self.cross) if t is not None)

    def state_dict(self) -> dict[str, torch.Tensor | int]:
        state: dict[str, torch.Tensor | int] = {"n": self.n, "count": self.count}
        for key, value in (("abs_sum", self.abs_sum), ("abs_max", self.abs_max), ("gram", self.gram),
                           ("cross", self.cross)):
            if value is not None:
                state[key] = value.cpu()
        return state

    @classmethod
    def from_state_dict(cls, state: dict, device: torch.device | str = "cpu") -> ChannelStats:
        stats = cls(int(state["n"]), needs=frozenset(), device=device)  # allocates nothing
        fields = (("gram", "gram"), ("abs", "abs_sum"), (CROSS, "cross"))
        stats.needs = frozenset(f for f, key in fields if key in state)
        stats.count = int(state["count"])
        if "gram" in state:
            stats.gram = state["gram"].to(device, torch.float64)
        if "abs_sum" in state:
            stats.abs_sum = state["abs_sum"].to(device, torch.float64)
            stats.abs_max = state["abs_max"].to(device, torch.float64)
        if "cross" in state:
            stats.cross = state["cross"].to(device, torch.float64)
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
        return sum(s.nbytes() for s in self.streams.values())

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


def combine_stats(*parts: ActivationStats) -> ActivationStats:
    """Statistics of the union of the token sets that ``parts`` were collected on (new tensors).

    Every field is a sum over tokens (Gram, abs-sum, count) or a max (abs-max), so statistics
    collected once per corpus combine into those of any mix of the corpora -- the same as one
    pass over all their windows, up to float rounding.  The parts must cover the same layers.
    """
    if not parts:
        raise ValueError("combine_stats needs at least one ActivationStats")
    first = parts[0]
    for i, part in enumerate(parts[1:], start=1):
        if part.owner != first.owner:
            raise ValueError(f"combine_stats: part {i} covers other layers or streams than part 0 "
                             "(collect every part with the same layer names)")
    out = ActivationStats()
    out.owner = dict(first.owner)
    for key, ref in first.streams.items():
        streams = [p.streams[key] for p in parts]
        if any(s.needs != ref.needs or s.n != ref.n for s in streams):
            raise ValueError(f"combine_stats: stream {key!r} was collected with other fields or widths in some parts")
        merged = ChannelStats(ref.n, needs=frozenset(), device=ref.device)  # allocates nothing
        merged.needs = ref.needs
        merged.count = sum(s.count for s in streams)
        if ref.gram is not None:
            merged.gram = torch.stack([s.gram for s in streams]).sum(0)
        if ref.abs_sum is not None:
            merged.abs_sum = torch.stack([s.abs_sum for s in streams]).sum(0)
            merged.abs_max = torch.stack([s.abs_max for s in streams]).amax(0)
        if ref.cross is not None:
            merged.cross = torch.stack([s.cross for s in streams]).sum(0)
        out.streams[key] = merged
    return out


class _SharedReads:
    """What :meth:`ChannelStats.derived` computed for one stream, kept for ``readers`` reads.  A reader computing
    holds the lock: another thread reading the same stream waits for the value instead of computing it again."""

    def __init__(self, readers: int) -> None:
        self.left = readers
        self.lock = threading.Lock()
        self.values: dict = {}

    def get(self, key: Hashable, compute: Callable[[], T]) -> T:
        with self.lock:
            if key not in self.values:
                self.values[key] = compute()
            value = self.values[key]
            self.left -= 1
            if self.left <= 0:  # the last announced reader: let go (a reader beyond the count computes afresh)
                self.values.clear()
            return value


@contextlib.contextmanager
def shared_reads(readers: Iterable[ChannelStats]) -> Iterator[None]:
    """One pass over layers: ``readers`` lists each layer's statistics (a stream read by q/k/v appears three
    times).  Inside, what :meth:`ChannelStats.derived` computes for a stream listed more than once is computed
    by its first reader and kept until its last one has it (at most until the pass ends); e.g. one Cholesky
    factor or eigendecomposition of the q/k/v input's Gram instead of three.  Streams listed once keep
    nothing."""
    counts: dict[int, list] = {}
    for stats in readers:
        counts.setdefault(id(stats), [stats, 0])[1] += 1
    shared = [stats for stats, n in counts.values() if n > 1]
    if any(stats._shared is not None for stats in shared):
        raise RuntimeError("shared_reads: these statistics are already in a pass")
    for stats in shared:
        stats._shared = _SharedReads(counts[id(stats)][1])
    try:
        yield
    finally:
        for stats in shared:
            stats._shared = None


_MATMUL_BACKENDS = (torch.backends.cuda.matmul, torch.backends.mkldnn.matmul)


@contextlib.contextmanager
def ieee_float32_matmul() -> Iterator[None]:
    """Full float32 products inside, whatever the process allows elsewhere.

    ``torch.set_float32_matmul_precision("high")`` (which Lightning suggests on every tensor-core GPU) lets a
    float32 GEMM run in TF32 on CUDA, and ``"medium"`` in bfloat16 through oneDNN on a CPU that has the
    instructions: inputs rounded to 10 or 7 mantissa bits instead of 23, unseen in the Grams.  Each backend whose
    effective setting is not ``"ieee"`` is set to it and restored on exit, through the per-backend settings only
    (``fp32_precision``), which leaves the legacy ``allow_tf32`` / ``get_float32_matmul_precision`` readable
    afterwards."""
    generic = torch.backends.fp32_precision
    changed = [(b, b.fp32_precision) for b in _MATMUL_BACKENDS
               if (b.fp32_precision if b.fp32_precision != "none" else generic) not in ("ieee", "none")]
    for backend, _ in changed:
        backend.fp32_precision = "ieee"
    try:
        yield
    finally:
        for backend, previous in changed:
            backend.fp32_precision = previous


def _gemm(x: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, Callable]:
    """``x`` in the GEMM's dtype and the product to use: bfloat16 multiplies with float32 output."""
    if dtype == torch.bfloat16:
        return x.to(torch.bfloat16), lambda a, b: torch.mm(a, b, out_dtype=torch.float32)
    return x.to(dtype), torch.mm  # no copy when the activations already have the GEMM's dtype
