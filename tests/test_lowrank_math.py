"""Numerical guarantees of the decomposition methods on a single weight (float64)."""

from __future__ import annotations

import pytest
import torch

from compression import ChannelStats, LowRankLinear, build_method, rank_for_ratio

M, N = 24, 32


def correlated_inputs(tokens: int, n: int = N, seed: int = 0) -> torch.Tensor:
    """Tokens ``(tokens x n)`` with strongly correlated channels (spectrum spans 1e3)."""
    g = torch.Generator().manual_seed(seed)
    q1, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    q2, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    decay = torch.logspace(0, -3, n, dtype=torch.float64)
    mix = q1 @ torch.diag(decay) @ q2 + 0.05 * torch.ones(n, n, dtype=torch.float64)
    return torch.randn(tokens, n, generator=g, dtype=torch.float64) @ mix * 3.0


def stats_of(x: torch.Tensor) -> ChannelStats:
    stats = ChannelStats(x.shape[1])
    stats.update(x, "layer")
    return stats


def weight(seed: int = 1) -> torch.Tensor:
    return torch.randn(M, N, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def truncated(method: str, w: torch.Tensor, stats: ChannelStats | None, rank: int, **kw) -> torch.Tensor:
    f = build_method(method, **kw).decompose(w, stats, rank, "layer")
    return f.up @ f.down


def output_error(w: torch.Tensor, w_hat: torch.Tensor, x: torch.Tensor) -> float:
    return float(torch.linalg.matrix_norm((w - w_hat) @ x.T))


@pytest.mark.parametrize("rank", [1, 4, 10, 17, 23])
def test_whitening_theorem(rank):
    x, w = correlated_inputs(400), weight()
    stats = stats_of(x)
    chol = torch.linalg.cholesky(x.T @ x)
    sigma = torch.linalg.svdvals(w @ chol)
    theory = float(sigma[rank:].square().sum().sqrt())
    err = output_error(w, truncated("svd_llm", w, stats, rank), x)
    assert err == pytest.approx(theory, rel=1e-8)
    # Eckart-Young on W Xᵀ directly: nothing of rank r does better.
    optimum = float(torch.linalg.svdvals(w @ x.T)[rank:].square().sum().sqrt())
    assert err == pytest.approx(optimum, rel=1e-8)
    others = {m: output_error(w, truncated(m, w, stats, rank), x) for m in ("svd", "asvd", "svd_llm_v2")}
    for name, other in others.items():
        assert other >= err * (1 - 1e-10), name
    assert others["svd"] > 1.05 * err  # on correlated inputs plain SVD is clearly worse
    # V2 reaches the same optimum (and the same truncated weight) on a positive-definite Gram.
    assert others["svd_llm_v2"] == pytest.approx(err, rel=1e-8)
    w2 = truncated("svd_llm_v2", w, stats, rank)
    torch.testing.assert_close(w2, truncated("svd_llm", w, stats, rank), rtol=0, atol=1e-7 * float(w.abs().max()))


def test_reported_truncation_loss_is_output_error():
    x, w = correlated_inputs(300), weight()
    for method in ("svd_llm", "svd_llm_v2"):
        f = build_method(method).decompose(w, stats_of(x), 7, "layer")
        assert f.truncation_loss == pytest.approx(output_error(w, f.up @ f.down, x), rel=1e-8)


@pytest.mark.parametrize("rank", [2, 6, 12])
def test_v2_optimal_with_fewer_tokens_than_features(rank, caplog):
    x, w = correlated_inputs(20), weight()  # 20 tokens < 32 features: Gram has rank 20
    stats = stats_of(x)
    assert int(torch.linalg.matrix_rank(stats.gram)) == 20
    with pytest.raises(torch.linalg.LinAlgError):
        torch.linalg.cholesky(stats.gram)
    optimum = float(torch.linalg.svdvals(w @ x.T)[rank:].square().sum().sqrt())
    assert output_error(w, truncated("svd_llm_v2", w, stats, rank), x) == pytest.approx(optimum, rel=1e-8)
    # svd_llm survives thanks to the relative jitter, and says so naming the layer.
    with caplog.at_level("WARNING"):
        err = output_error(w, truncated("svd_llm", w, stats, rank), x)
    assert "layer 'layer'" in caplog.text and "jitter" in caplog.text
    assert err >= optimum * (1 - 1e-10)
    assert err == pytest.approx(optimum, rel=1e-3)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "svd_llm_v2"])
def test_full_rank_reproduces_layer(method):
    x, w = correlated_inputs(200), weight()
    w_hat = truncated(method, w, stats_of(x), min(M, N))
    torch.testing.assert_close(w_hat, w, rtol=0, atol=1e-8)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm", "svd_llm_v2"])
def test_error_decreases_with_rank(method):
    x, w = correlated_inputs(200), weight()
    stats = stats_of(x)
    handler = build_method(method)
    losses = [handler.decompose(w, stats, r, "layer").truncation_loss for r in range(1, M + 1)]
    assert all(b <= a * (1 + 1e-12) for a, b in zip(losses, losses[1:]))
    assert losses[-1] == pytest.approx(0.0, abs=1e-8 * losses[0])
    if method in ("svd_llm", "svd_llm_v2"):  # for whitening, the real output error too
        errors = [output_error(w, truncated(method, w, stats, r), x) for r in range(1, M + 1)]
        assert all(b < a for a, b in zip(errors, errors[1:-1]))


@pytest.mark.parametrize("beta", [0.0, 0.2, 0.5, 1.0])
def test_beta_changes_the_split_not_the_product(beta):
    x, w = correlated_inputs(200), weight()
    stats = stats_of(x)
    ref = truncated("svd_llm", w, stats, 9)
    f = build_method("svd_llm", beta=beta).decompose(w, stats, 9, "layer")
    torch.testing.assert_close(f.up @ f.down, ref, rtol=0, atol=1e-9)
    # with beta = 0 the up factor carries all of Σ, so down rows are orthonormal in the whitened space
    if beta == 0.0:
        chol = torch.linalg.cholesky(stats.gram)
        torch.testing.assert_close((f.down @ chol) @ (f.down @ chol).T, torch.eye(9, dtype=torch.float64))


def test_asvd_scaling_modes_differ_and_respect_alpha():
    x, w = correlated_inputs(200), weight()
    stats = stats_of(x)
    a = truncated("asvd", w, stats, 8, scaling="abs_mean", alpha=0.5)
    b = truncated("asvd", w, stats, 8, scaling="abs_max", alpha=0.5)
    c = truncated("asvd", w, stats, 8, scaling="abs_mean", alpha=1.0)
    assert not torch.allclose(a, b) and not torch.allclose(a, c)
    # ASVD is exactly SVD of W diag(s) mapped back
    s = stats.abs_mean.pow(0.5)
    u, sig, vh = torch.linalg.svd(w * s, full_matrices=False)
    torch.testing.assert_close(a, (u[:, :8] * sig[:8]) @ vh[:8] / s, rtol=0, atol=1e-10)


def test_lowrank_layer_merge_round_trip():
    torch.manual_seed(0)
    dense = torch.nn.Linear(N, M, bias=True).double()
    f = build_method("svd").decompose(dense.weight, None, 10, "layer")
    low = LowRankLinear.from_linear(dense, 10, f.up, f.down)
    merged = low.to_linear()
    assert torch.equal(merged.weight, low.up.weight @ low.down.weight)
    assert torch.equal(merged.bias, dense.bias)
    x = torch.randn(5, 3, N, dtype=torch.float64)
    torch.testing.assert_close(merged(x), low(x), rtol=0, atol=1e-12)
    assert low.num_parameters() == 10 * (M + N) + M
    assert low.flops_per_token() == 2 * 10 * (M + N)
    assert "rank=10" in repr(low)
    full = LowRankLinear.from_linear(dense, min(M, N), *_full(dense))
    torch.testing.assert_close(full(x), dense(x), rtol=0, atol=1e-12)


def _full(dense):
    f = build_method("svd").decompose(dense.weight, None, min(M, N), "layer")
    return f.up, f.down


def test_rank_for_ratio_matches_formula():
    assert rank_for_ratio(576, 576, 0.2) == int(0.8 * 576 * 576 // 1152) == 230
    assert rank_for_ratio(1536, 576, 0.6) == int(0.4 * 1536 * 576 / 2112)
    assert rank_for_ratio(4, 4, 0.99) == 1
    for bad in (-0.1, 1.0, 1.5):
        with pytest.raises(ValueError, match="ratio"):
            rank_for_ratio(8, 8, bad)


@pytest.mark.parametrize("method", ["svd_llm", "svd_llm_v2"])
@pytest.mark.parametrize("lam", [0.0, 0.05, 0.5, 0.9])
def test_shrinkage_solves_the_ridge_objective(method, lam):
    """With shrinkage λ the truncation is the optimum of (1-λ)‖ΔW Xᵀ‖² + λ c ‖ΔW‖² (c = mean diag XᵀX):
    that objective is ‖ΔW S‖² for any S Sᵀ = G_λ, so Eckart-Young on W S (S the symmetric root, not
    the method's Cholesky / eigen basis) gives the same truncated weight and the same loss."""
    x, w, rank = correlated_inputs(400), weight(), 7
    gram = x.T @ x
    c = float(gram.diagonal().mean())
    shrunk = (1 - lam) * gram + lam * c * torch.eye(N, dtype=torch.float64)
    evals, evecs = torch.linalg.eigh(shrunk)
    root = evecs @ torch.diag(evals.sqrt()) @ evecs.T
    u, s, vh = torch.linalg.svd(w @ root)
    optimum = (u[:, :rank] * s[:rank]) @ vh[:rank] @ torch.linalg.inv(root)
    f = build_method(method, shrinkage=lam).decompose(w, stats_of(x), rank, "layer")
    torch.testing.assert_close(f.up @ f.down, optimum, rtol=1e-7, atol=1e-9)
    delta = w - f.up @ f.down
    objective = (1 - lam) * output_error(w, f.up @ f.down, x) ** 2 + lam * c * float(delta.square().sum())
    assert f.truncation_loss**2 == pytest.approx(objective, rel=1e-8)
    assert f.truncation_loss**2 == pytest.approx(float(s[rank:].square().sum()), rel=1e-8)


def test_shrinkage_trades_calibration_error_for_weight_error():
    """More shrinkage: the calibration output error grows and the plain weight error falls (monotone),
    and λ -> 1 approaches plain SVD's truncated weight."""
    x, w, rank = correlated_inputs(400), weight(), 5
    stats = stats_of(x)
    fits = [truncated("svd_llm", w, stats, rank, shrinkage=lam) for lam in (0.0, 0.1, 0.5, 0.999)]
    out = [output_error(w, f, x) for f in fits]
    plain = [float(torch.linalg.matrix_norm(w - f)) for f in fits]
    assert out == sorted(out) and out[-1] > 1.05 * out[0]
    assert plain == sorted(plain, reverse=True) and plain[0] > 1.05 * plain[-1]
    torch.testing.assert_close(fits[-1], truncated("svd", w, None, rank), rtol=0, atol=1e-2 * float(w.abs().max()))


@pytest.mark.parametrize("bad", [-0.1, 1.0, 2.0])
def test_shrinkage_out_of_range_is_refused(bad):
    with pytest.raises(ValueError, match="shrinkage"):
        build_method("svd_llm", shrinkage=bad)
    with pytest.raises(ValueError, match="shrinkage"):
        build_method("svd_llm_v2", shrinkage=bad)
