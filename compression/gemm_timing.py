"""Measured GEMM times per shape and weight layout, cached on disk.

The inference transform (:mod:`compression.fused`) decides two things by measurement, not by
FLOP counts, because at small batch sizes a GEMM's speed depends on more than its FLOPs:

- the **layout** of a weight ``W (out x in)`` for ``y = x Wᵀ``: ``"rowmajor"`` stores ``W`` as is
  (``nn.Linear``'s layout, the BLAS call transposes it), ``"transposed"`` stores ``Wᵀ (in x out)``
  contiguously and hands the BLAS an untransposed operand.  The arithmetic is the same; the
  measured speed of a batch-1 product on a CPU is not (see ``docs/results/llm_efficiency.md``);
- whether a factored layer ``x -> (x Dᵀ) Uᵀ`` is slower than its merged dense form ``x (U D)ᵀ`` at
  the deployment batch size (then it is merged back).

On a CPU the key includes the OpenMP wait policy (``OMP_WAIT_POLICY`` as this process's environment
says, ``default`` when unset): with ``PASSIVE`` every parallel region wakes sleeping threads, and on
2 cores a batch-1 product took 63-189 µs instead of 4-68 µs (SmolLM2's shapes, 2026-12-04), which
turned merge decisions around; a timing taken under one policy must not steer a process running
under the other.

A measurement is ``best of repeats`` of the mean time per call over a pool of weight copies
(``stream_bytes``, default 64 MiB, at most 64 copies) cycled through, so that a call does not find its
weight where the previous call left it in the cache, as a decode step reading the whole model does
not.  (A 1 GiB pool, over the 480 MiB L3 one machine here reports, gave the same counts of merged
layers and padded GEMMs for SmolLM2 at ratio 0.6, 2026-12-04.)  Results are cached in a JSON file
keyed by device (type and name), dtype, intra-op threads, OpenMP wait policy (CPU), tokens, shape and
layout, so each shape is measured once per machine and policy; the file is rewritten atomically.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from compression.io import atomic_write_text

log = logging.getLogger(__name__)

LAYOUTS = ("rowmajor", "transposed")


def default_cache_path() -> Path:
    """``$SVD_VGGT_CACHE/gemm_timings.json`` (default ``~/.cache/svd-vggt``)."""
    root = os.environ.get("SVD_VGGT_CACHE")
    return (Path(root).expanduser() if root else Path.home() / ".cache" / "svd-vggt") / "gemm_timings.json"


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.processor() or platform.machine()}:{os.cpu_count()}cpu"


def omp_wait_policy() -> str:
    """``OMP_WAIT_POLICY`` as set in this process's environment (upper case), ``"default"`` when unset: the
    OpenMP runtime reads it once, when torch loads it, so set it before importing torch."""
    return os.environ.get("OMP_WAIT_POLICY", "").strip().upper() or "default"


def make_weight(out_features: int, in_features: int, layout: str, dtype: torch.dtype,
                device: torch.device) -> torch.Tensor:
    """A random ``(out x in)`` weight stored in ``layout`` (a transposed view for ``"transposed"``)."""
    if layout == "rowmajor":
        return torch.randn(out_features, in_features, dtype=dtype, device=device)
    if layout == "transposed":
        return torch.randn(in_features, out_features, dtype=dtype, device=device).t()
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


class GemmTimer:
    """Seconds per ``F.linear(x [tokens x in], W [out x in])`` call, measured once per key.

    Args:
        cache_path: JSON cache file; ``None``: :func:`default_cache_path`; ``False``: no file.
        repeats: best of this many timed rounds.
        min_seconds: each round runs at least this long.
        stream_bytes: size of the weight pool cycled through (see the module docstring).
    """

    def __init__(self, cache_path: str | os.PathLike | bool | None = None, repeats: int = 5,
                 min_seconds: float = 0.01, stream_bytes: int = 64 * 2**20) -> None:
        self.path = None if cache_path is False else Path(cache_path or default_cache_path())
        self.repeats, self.min_seconds, self.stream_bytes = repeats, min_seconds, stream_bytes
        self.measured = 0  # shapes measured (not found in the cache) by this timer
        self._cache: dict[str, float] = {}
        if self.path is not None and self.path.is_file():
            try:
                self._cache = {str(k): float(v) for k, v in json.loads(self.path.read_text()).items()}
            except (ValueError, AttributeError):
                log.warning("ignoring unreadable GEMM timing cache %s", self.path)

    @staticmethod
    def key(out_features: int, in_features: int, tokens: int, layout: str, dtype: torch.dtype,
            device: torch.device) -> str:
        omp = f"omp={omp_wait_policy()}|" if device.type == "cpu" else ""
        return (f"{device_name(device)}|{str(dtype).removeprefix('torch.')}|threads={torch.get_num_threads()}|"
                f"{omp}tokens={tokens}|{out_features}x{in_features}|{layout}")

    @torch.no_grad()
    def seconds(self, out_features: int, in_features: int, tokens: int, layout: str = "rowmajor",
                dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> float:
        device = torch.device(device)
        key = self.key(out_features, in_features, tokens, layout, dtype, device)
        if key not in self._cache:
            self._cache[key] = self._measure(out_features, in_features, tokens, layout, dtype, device)
            self.measured += 1
        return self._cache[key]

    def _measure(self, out_features, in_features, tokens, layout, dtype, device) -> float:
        nbytes = out_features * in_features * torch.finfo(dtype).bits // 8
        pool = [make_weight(out_features, in_features, layout, dtype, device)
                for _ in range(max(1, min(64, math.ceil(self.stream_bytes / nbytes))))]
        x = torch.randn(tokens, in_features, dtype=dtype, device=device)
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        for w in pool:  # warm-up: first-touch pages, BLAS workspaces
            F.linear(x, w)
        best = math.inf
        for _ in range(self.repeats):
            calls, start = 0, time.perf_counter()
            while True:
                for w in pool:
                    F.linear(x, w)
                calls += len(pool)
                sync()
                elapsed = time.perf_counter() - start
                if elapsed >= self.min_seconds:
                    break
            best = min(best, elapsed / calls)
        return best

    def save(self) -> None:
        """Write the cache file (when there is one and something new was measured)."""
        if self.path is None or not self.measured:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self._cache, indent=0, sort_keys=True))
