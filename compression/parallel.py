"""Decompositions in a small thread pool, results in order, a bounded number in flight.

Each matrix's decomposition is a few LAPACK calls (Cholesky or eigendecomposition of its Gram, one
SVD) on a matrix of a few hundred to a few thousand rows.  On a CPU those calls use the intra-op
threads poorly at these sizes, and they release the GIL, so running two matrices at once in two
Python threads finishes sooner than running them one after the other with two intra-op threads each
(``docs/results/compression_cost.md`` measures both in one run).  A single batched
``torch.linalg`` call on a stack of same-shaped matrices does not help on the CPU: it loops over the
stack one matrix at a time.

The cost is memory: ``threads`` matrices' float64 working sets (weight, transformed weight, ``U``,
``Σ``, ``Vᵀ``, factors) are alive at once instead of one; ``threads=1`` is the plain loop in the
calling thread, with the one-matrix bound.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import TypeVar

T = TypeVar("T")
R = TypeVar("R")


def check_threads(value: object, what: str = "decompose_threads") -> int:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"{what} must be an integer >= 1 (1: one matrix at a time), got {value!r}")
    return value


@contextmanager
def ordered_map(fn: Callable[[T], R], items: Iterable[T], threads: int) -> Iterator[Iterator[R]]:
    """``with ordered_map(fn, items, threads) as results: for r in results: ...``

    ``fn(item)`` for every item, yielded in the order of ``items``.  ``items`` is read lazily in the
    calling thread, at most ``threads`` items at a time: an item is taken only when a result has been
    handed out, so at most ``threads`` calls of ``fn`` run or wait to be collected at any moment.  An
    exception raised by ``fn`` is raised where its result would have been yielded; on leaving the
    ``with`` block (normally or by an exception) calls not yet started are cancelled and running ones
    are waited for, so no decomposition outlives the block.
    """
    threads = check_threads(threads)
    if threads == 1:
        yield (fn(item) for item in items)
        return
    pool = ThreadPoolExecutor(threads, thread_name_prefix="decompose")
    pending: deque[Future] = deque()

    def results() -> Iterator[R]:
        source = iter(items)
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) == threads:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()

    try:
        yield results()
    finally:
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True)
