"""``svd_llm_v2``'s square root of the Gram (``root``): with every eigenvalue above ``eig_rtol · max`` nothing is
dropped and any root gives the same truncation, so ``auto`` takes the Cholesky factor; otherwise, and for
``root: eigh``, the eigendecomposition.  ``margin_cholesky`` decides without computing an eigenvalue."""

from __future__ import annotations

import pytest
import torch

from compression import ChannelStats, build_method
from compression.whitening import margin_cholesky

N = 40


def gram_with(evals: torch.Tensor, seed: int = 0) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(len(evals), len(evals), generator=torch.Generator().manual_seed(seed),
                                       dtype=torch.float64))
    g = q @ torch.diag(evals) @ q.T
    return (g + g.T) / 2


def stats_with(gram: torch.Tensor) -> ChannelStats:
    st = ChannelStats(gram.shape[0], needs={"gram"})
    st.gram, st.count = gram.clone(), 10 * gram.shape[0]
    return st


def weight(m: int, n: int = N, seed: int = 1) -> torch.Tensor:
    return torch.randn(m, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def product(method, w, st, rank):
    f = method.decompose(w, st, rank, "layer")
    return f.up @ f.down, f


@pytest.mark.parametrize("decades", [2, 8])  # condition numbers 1e2 and 1e8
@pytest.mark.parametrize("m", [24, 40, 64])  # wide, square, tall
@pytest.mark.parametrize("shrinkage", [0.0, 0.2])
def test_auto_takes_the_cholesky_factor_and_matches_the_eigendecomposition(decades, m, shrinkage):
    gram = gram_with(torch.logspace(0, -decades, N, dtype=torch.float64))
    st, w = stats_with(gram), weight(m)
    auto = build_method("svd_llm_v2", shrinkage=shrinkage)
    eigh = build_method("svd_llm_v2", shrinkage=shrinkage, root="eigh")
    mat, ctx = auto.transformed(w, st, "layer")
    assert isinstance(ctx, torch.Tensor) and torch.equal(ctx, torch.tril(ctx))  # T = L
    assert isinstance(eigh.transformed(w, st, "layer")[1], tuple)
    for rank in (1, 7, 20, min(m, N)):
        pa, fa = product(auto, w, st, rank)
        pe, fe = product(eigh, w, st, rank)
        # the same truncation: products agree to rounding amplified by the root's condition (10^(decades/2))
        assert float((pa - pe).norm() / w.norm()) < 1e-13 * 10 ** (decades / 2)
        assert fa.truncation_loss == pytest.approx(fe.truncation_loss, rel=1e-9, abs=1e-12 * fe.total_energy ** 0.5)
        assert fa.total_energy == pytest.approx(fe.total_energy, rel=1e-12)
    torch.testing.assert_close(auto.spectrum(w, st, "layer"), eigh.spectrum(w, st, "layer"), rtol=1e-9,
                               atol=1e-12 * float(w.norm()))


def test_below_the_threshold_auto_is_the_eigendecomposition(caplog):
    evals = torch.logspace(0, -6, N, dtype=torch.float64)
    evals[-3:] = 1e-13  # three directions the calibration never visited
    st, w = stats_with(gram_with(evals)), weight(24)
    auto, eigh = build_method("svd_llm_v2"), build_method("svd_llm_v2", root="eigh")
    assert margin_cholesky(st.gram, 1e-10) is None
    assert isinstance(auto.transformed(w, st, "layer")[1], tuple)
    with caplog.at_level("INFO"):
        fa = auto.decompose(w, st, 10, "layer")
    assert "3 of 40 Gram directions unseen in calibration are dropped" in caplog.text
    fe = eigh.decompose(w, st, 10, "layer")
    assert torch.equal(fa.up, fe.up) and torch.equal(fa.down, fe.down)  # the same path, bit for bit


@pytest.mark.parametrize("factor, chol", [(0.5, False), (1.5 * N ** 0.5, True)])
def test_margin_at_the_threshold(factor, chol):
    """Smallest eigenvalue ``factor · rtol · λ_max``: below the threshold never Cholesky; above the bound's
    slack (``‖G‖_∞ <= sqrt(n) λ_max``) always."""
    rtol = 1e-6
    evals = torch.logspace(0, -3, N, dtype=torch.float64)
    evals[-1] = factor * rtol
    gram = gram_with(evals, seed=3)
    assert float(gram.abs().sum(1).max()) <= N ** 0.5 * float(evals.max()) * (1 + 1e-12)
    got = margin_cholesky(gram, rtol)
    assert (got is not None) == chol
    if chol:
        torch.testing.assert_close(got @ got.T, gram, rtol=0, atol=1e-14 * float(evals.max()))
        assert torch.equal(got, torch.linalg.cholesky(gram))  # the factor of G itself, not of the shifted Gram


def test_a_singular_gram_has_no_margin():
    x = torch.randn(10, N, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    assert margin_cholesky(x.T @ x, 1e-10) is None


def test_the_root_is_checked():
    with pytest.raises(ValueError, match="root must be one of"):
        build_method("svd_llm_v2", root="cholesky")
