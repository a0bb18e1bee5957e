"""Hadamard and random orthogonal matrices, including sizes that are not powers of two.

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``, so ``H / √n`` is
orthogonal and spreads every coordinate evenly over all outputs (which is what flattens
activation outliers before quantization).  Constructions used here:

- Sylvester: ``H_1 = [1]``, ``H_2k = [[H_k, H_k], [H_k, -H_k]]`` -- every power of two.
- Paley I, prime ``p ≡ 3 (mod 4)``: order ``p + 1`` (4, 8, 12, 20, 24, 32, 44, 48, ...).
- Paley II, prime ``q ≡ 1 (mod 4)``: order ``2 (q + 1)`` (12, 28, 36, 60, 76, 108, ...).
- Kronecker products: ``H_a ⊗ H_b`` is Hadamard of order ``a b``.

``hadamard_factors(n)`` writes ``n`` as a product of such orders (the smallest non-power-of-two
order first, the power of two last), e.g. ``576 = 12 · 12 · 4`` and ``1536 = 12 · 128``, and
:func:`hadamard_transform` applies ``x ↦ x (H_{a} ⊗ H_{b} ⊗ ...) / √n`` by reshaping the last
axis to ``(a, b, ...)`` and multiplying each axis by its small factor: ``n (a + b + ...)``
multiply-adds per row instead of ``n²`` for the dense matrix.  Orders with no such
decomposition (e.g. 9·2^k with no Paley factor found, or odd n) fall back to a seeded random
orthogonal matrix (QR of a Gaussian with the sign of ``diag(R)`` fixed, i.e. Haar-distributed).

On CPU nothing faster is needed at these sizes: ``hadamard-transform`` (PyPI) is power-of-two
only and ``fast-hadamard-transform`` is CUDA-only.
"""

from __future__ import annotations

import functools
import math

import torch


def _is_prime(p: int) -> bool:
    return p >= 2 and all(p % d for d in range(2, math.isqrt(p) + 1))


def _is_pow2(n: int) -> bool:
    return n >= 1 and n & (n - 1) == 0


def sylvester(n: int) -> torch.Tensor:
    """±1 Hadamard matrix of order ``n = 2^k`` (float64)."""
    if not _is_pow2(n):
        raise ValueError(f"Sylvester construction needs a power of two, got {n}")
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q[i, j] = χ(j - i)`` with χ the quadratic character mod prime ``q``."""
    squares = {(x * x) % q for x in range(1, q)}
    chi = [0] + [1 if a in squares else -1 for a in range(1, q)]
    idx = torch.arange(q)
    return torch.tensor(chi, dtype=torch.float64)[(idx[None, :] - idx[:, None]) % q]


def paley(n: int) -> torch.Tensor | None:
    """±1 Hadamard matrix of order ``n`` by Paley I (``n-1`` prime ≡ 3 mod 4) or II (``n/2-1`` prime ≡ 1 mod 4)."""
    p = n - 1
    if _is_prime(p) and p % 4 == 3:
        q = _jacobsthal(p)  # skew: Qᵀ = -Q
        s = torch.zeros(n, n, dtype=torch.float64)
        s[0, 1:], s[1:, 0] = 1.0, -1.0
        s[1:, 1:] = q
        return s + torch.eye(n, dtype=torch.float64)
    if n % 2 == 0:
        q_ = n // 2 - 1
        if _is_prime(q_) and q_ % 4 == 1:
            q = _jacobsthal(q_)  # symmetric
            c = torch.zeros(q_ + 1, q_ + 1, dtype=torch.float64)
            c[0, 1:], c[1:, 0] = 1.0, 1.0
            c[1:, 1:] = q
            plus = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
            minus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
            eye = torch.eye(q_ + 1, dtype=torch.float64)
            # entry 0 -> `minus`, ±1 -> ±`plus`
            return torch.kron(c, plus) + torch.kron(eye, minus)
    return None


@functools.cache
def _paley_orders(limit: int) -> tuple[int, ...]:
    def constructible(n: int) -> bool:
        p, q = n - 1, n // 2 - 1
        return (_is_prime(p) and p % 4 == 3) or (_is_prime(q) and q % 4 == 1)

    return tuple(n for n in range(4, limit + 1, 4) if not _is_pow2(n) and constructible(n))


@functools.cache
def hadamard_factors(n: int) -> tuple[int, ...] | None:
    """Orders ``(a, b, ..., 2^k)`` with product ``n``, each a Paley order or a power of two; ``None`` if none."""
    if n < 1:
        raise ValueError(f"order must be positive, got {n}")
    if n == 1:
        return ()
    if _is_pow2(n):
        return (n,)
    for h in _paley_orders(n):
        if n % h == 0:
            rest = hadamard_factors(n // h)
            if rest is not None:
                return (h, *rest)
    return None


def _factor_matrix(h: int) -> torch.Tensor:
    return sylvester(h) if _is_pow2(h) else paley(h)


def is_hadamard_order(n: int) -> bool:
    return hadamard_factors(n) is not None


def hadamard_matrix(n: int, normalized: bool = True) -> torch.Tensor:
    """Dense Hadamard matrix ``(n x n)`` float64 (the Kronecker product of :func:`hadamard_factors`).

    ``normalized=True`` divides by ``√n`` (orthogonal).  Raises for orders with no construction here.
    """
    factors = hadamard_factors(n)
    if factors is None:
        raise ValueError(f"no Hadamard construction for order {n}; use random_orthogonal({n})")
    h = torch.ones(1, 1, dtype=torch.float64)
    for f in factors:
        h = torch.kron(h, _factor_matrix(f))
    return h / math.sqrt(n) if normalized else h


def random_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """Haar-random orthogonal ``(n x n)`` float64 matrix from a seeded generator."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, n, generator=g, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r))[None, :]


def random_signs(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2.0 - 1.0


def randomized_hadamard(n: int, seed: int = 0) -> torch.Tensor:
    """``diag(s) H / √n`` with random signs ``s`` (QuaRot's H1); random orthogonal where no Hadamard exists."""
    if not is_hadamard_order(n):
        return random_orthogonal(n, seed)
    return random_signs(n, seed)[:, None] * hadamard_matrix(n)


def rotation_matrix(n: int, kind: str = "hadamard", seed: int = 0) -> torch.Tensor:
    """Orthogonal ``(n x n)`` float64: ``kind`` in ``{"hadamard", "random_hadamard", "orthogonal"}``."""
    if kind == "hadamard":
        return hadamard_matrix(n) if is_hadamard_order(n) else random_orthogonal(n, seed)
    if kind == "random_hadamard":
        return randomized_hadamard(n, seed)
    if kind == "orthogonal":
        return random_orthogonal(n, seed)
    raise ValueError(f"unknown rotation kind {kind!r}; choose 'hadamard', 'random_hadamard' or 'orthogonal'")


class HadamardTransform(torch.nn.Module):
    """``x [..., n] -> x H / √n`` with ``H`` the Kronecker product of small factors (see module docstring).

    The factors are non-persistent buffers (rebuilt from ``n``), so nothing is saved in state dicts.
    Orders without a Hadamard construction use a dense seeded random orthogonal matrix instead.
    """

    def __init__(self, n: int, seed: int = 0) -> None:
        super().__init__()
        self.n = n
        factors = hadamard_factors(n)
        self.dense = factors is None
        self.factors = factors if factors else (n,)
        mats = [random_orthogonal(n, seed)] if self.dense else [_factor_matrix(f) for f in self.factors]
        for i, m in enumerate(mats):
            self.register_buffer(f"factor{i}", m, persistent=False)  # float64 until the model is cast
        self.scale = 1.0 if self.dense else 1.0 / math.sqrt(n)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.n:
            raise ValueError(f"HadamardTransform of order {self.n} got input with {x.shape[-1]} channels")
        lead = x.shape[:-1]
        y = x.reshape(-1, *self.factors)
        for i in range(len(self.factors)):
            m = getattr(self, f"factor{i}").to(x.dtype)
            # contract axis i+1 with the rows of factor i: y[..., a_i, ...] -> Σ_a y[..., a, ...] H[a, b]
            y = torch.movedim(torch.movedim(y, i + 1, -1) @ m, -1, i + 1)
        return (y.reshape(*lead, self.n) * self.scale) if not self.dense else y.reshape(*lead, self.n)

    def matrix(self) -> torch.Tensor:
        """The dense orthogonal matrix ``M`` (float64) with ``forward(x) = x @ M``."""
        if self.dense:
            return self.factor0.double()
        return hadamard_matrix(self.n)

    def extra_repr(self) -> str:
        return f"n={self.n}, factors={'dense-orthogonal' if self.dense else self.factors}"
