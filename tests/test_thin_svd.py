"""The decomposition's solver: the Gram-side eigendecomposition (default) against LAPACK's SVD."""

from __future__ import annotations

import pytest
import torch

from compression import build_method
from compression.methods import SVDConfig, singular_values, thin_svd

EPS = torch.finfo(torch.float64).eps


def spectrum_matrix(m: int, n: int, decades: float = 9.0, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u, _ = torch.linalg.qr(torch.randn(m, k, dtype=torch.float64, generator=gen))
    v, _ = torch.linalg.qr(torch.randn(n, k, dtype=torch.float64, generator=gen))
    s = torch.logspace(0, -decades, k, dtype=torch.float64)
    return (u * s) @ v.T, s


@pytest.mark.parametrize("shape", [(60, 60), (90, 40), (40, 90)])
def test_truncation_error_at_every_rank_equals_the_svds(shape):
    """Eckart-Young to the Gram's rounding: at every rank ``‖A - A_r‖_F²`` within ``10 max(m, n) ε ‖A‖²`` of the
    optimum ``Σ_{i>r} σ_i²``, and ``sqrt(Σ_{i>r} s_i²)`` (the reported loss) equal to ``‖A - A_r‖_F`` to 1e-13 ‖A‖;
    every ``s_i²`` within ``10 max(m, n) ε σ_max²`` of ``σ_i²`` (Weyl: small singular values lose relative accuracy,
    large ones keep it); the full-rank product gives ``A`` back to 1e-13."""
    a, s_true = spectrum_matrix(*shape)
    u, s, vh = thin_svd(a, "gram_eigh")
    assert u.shape == (shape[0], min(shape)) and vh.shape == (min(shape), shape[1])
    assert bool((s[:-1] >= s[1:]).all())
    weyl = 10 * max(shape) * EPS * float(s_true[0]) ** 2
    assert float((s.square() - s_true.square()).abs().max()) <= weyl
    big = s_true > 1e-4
    torch.testing.assert_close(s[big], s_true[big], rtol=1e-7, atol=0)
    assert float((u * s @ vh - a).norm() / a.norm()) < 1e-13
    scale = float(a.norm())
    for r in range(1, min(shape) + 1):
        err = float((a - (u[:, :r] * s[:r]) @ vh[:r]).norm())
        assert abs(err**2 - float(s_true[r:].square().sum())) <= 10 * max(shape) * EPS * scale**2, r
        assert abs(err - float(s[r:].norm())) <= 1e-13 * scale, r
    ref = torch.linalg.svdvals(a)
    assert float((singular_values(a, "gram_eigh").square() - ref.square()).abs().max()) <= weyl
    torch.testing.assert_close(singular_values(a, "svd"), ref, rtol=0, atol=0)


def test_rank_deficient_matrix_gives_finite_factors():
    """Zero singular values (a weight with zero rows and columns): no division by zero; the factors at full rank
    still multiply back to the matrix."""
    a, _ = spectrum_matrix(30, 20, decades=2)
    a[:, 5:] = 0.0
    a[7] = 0.0
    method = build_method(SVDConfig(solver="gram_eigh"))
    factors = method.decompose(a, None, 20, "layer")
    assert bool(torch.isfinite(factors.up).all() and torch.isfinite(factors.down).all())
    assert float((factors.up @ factors.down - a).norm() / a.norm()) < 1e-13
    s = method.spectrum(a, None, "layer")
    assert float(s[5:].max()) < 1e-7 * float(s[0])


@pytest.mark.parametrize("beta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("shape", [(50, 30), (30, 50)])
def test_both_solvers_give_the_same_product_and_loss(beta, shape):
    """With a gap at the cut, both solvers truncate to the same subspace: the products agree to 1e-10, the reported
    truncation loss to 1e-10 of ‖A‖, for every split of Σ between the factors."""
    a, _ = spectrum_matrix(*shape, decades=6, seed=1)
    f = {solver: build_method(SVDConfig(beta=beta, solver=solver)).decompose(a, None, 12, "layer")
         for solver in ("gram_eigh", "svd")}
    scale = float(a.norm())
    assert float((f["gram_eigh"].up @ f["gram_eigh"].down - f["svd"].up @ f["svd"].down).norm()) < 1e-10 * scale
    assert abs(f["gram_eigh"].truncation_loss - f["svd"].truncation_loss) < 1e-10 * scale
    assert abs(f["gram_eigh"].total_energy - f["svd"].total_energy) < 1e-12 * scale**2


def test_unknown_solver_is_refused():
    with pytest.raises(ValueError, match="solver must be one of"):
        SVDConfig(solver="qr")


def test_non_finite_matrix_names_the_layer():
    a = torch.eye(4, dtype=torch.float64)
    a[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="'blocks.3.fc1'"):
        thin_svd(a, "gram_eigh", "blocks.3.fc1")
