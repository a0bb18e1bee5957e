"""Dense targets (``calibration.dense_targets``): SVD-LLM fitted to the dense model's outputs.

- the factorization: with reference inputs equal to the inputs the factors are SVD-LLM's exactly; on random
  ``X_d != X_c`` the rank-r solution of ``min ‖W X_dᵀ - W' X_cᵀ‖`` matches an independent QR route, beats the
  symmetric SVD-LLM factors and random perturbations, and at full rank is the least-squares solution; with
  shrinkage it solves the ridge-augmented problem;
- the cross Gram: float32 GEMMs match the float64 product, whole or split into batches; reduce_ sums it;
- end to end (tiny LLaMA, sequential, compressed propagation): block 0 (identical streams) gets the plain
  sequential factors bit for bit, block 1 the closed form on the inputs hooked in the dense and in the
  partly compressed model; refusals name what to change.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import ChannelStats, Recipe, build_method, compress_
from compression.stats import ActivationStats
from lightning_modules.specs import CausalLMSpec
from tests.conftest import layer_inputs
from tests.test_sequential import _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = {"mode": "sequential", "propagate": "compressed", "progress": False}


def _stats(x: torch.Tensor, reference: torch.Tensor | None = None) -> ChannelStats:
    needs = {"gram", "cross"} if reference is not None else {"gram"}
    stats = ChannelStats(x.shape[-1], needs=needs)
    stats.update(x, "layer", reference)
    return stats


def _product(method, w, stats, rank):
    f = method.decompose(w, stats, rank, "layer")
    return f.up @ f.down


def _objective(w, wp, xd, xc):
    return float((xd @ w.T - xc @ wp.T).detach().norm())


def _problem(seed=0, n=12, m=9, tokens=60, drift=0.3):
    g = torch.Generator().manual_seed(seed)
    xd = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3, n, dtype=torch.float64)
    xc = xd + drift * torch.randn(tokens, n, generator=g, dtype=torch.float64)
    return torch.randn(m, n, generator=g, dtype=torch.float64), xd, xc


def _qr_optimum(w, xd, xc, rank):
    """Independent route: X_c = Q R, ‖W X_dᵀ - W' X_cᵀ‖² = ‖W X_dᵀ Q - W' Rᵀ‖² + const: rank-r of W X_dᵀ Q."""
    q, r = torch.linalg.qr(xc)
    u, s, vh = torch.linalg.svd(w @ xd.T @ q, full_matrices=False)
    best = (u[:, :rank] * s[:rank]) @ vh[:rank]
    return torch.linalg.solve_triangular(r.T, best, upper=False, left=False)


def test_equal_streams_give_svd_llm_exactly():
    w, x, _ = _problem()
    for shrinkage in (0.0, 0.1):
        method = build_method("svd_llm", shrinkage=shrinkage)
        plain, target = method.decompose(w, _stats(x), 5, "l"), method.decompose(w, _stats(x, x.clone()), 5, "l")
        assert torch.equal(target.up, plain.up) and torch.equal(target.down, plain.down)


@pytest.mark.parametrize("rank", [1, 4, 8])
def test_rank_r_optimum_matches_qr_route_and_beats_alternatives(rank):
    w, xd, xc = _problem()
    method = build_method("svd_llm")
    got = _product(method, w, _stats(xc, xd), rank)
    want = _qr_optimum(w, xd, xc, rank)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    assert torch.linalg.matrix_rank(got) == rank
    best = _objective(w, got, xd, xc)
    symmetric = _objective(w, _product(method, w, _stats(xc), rank), xd, xc)
    assert best < symmetric * (1 - 1e-3)  # the drift is large enough to matter
    g = torch.Generator().manual_seed(1)
    f = method.decompose(w, _stats(xc, xd), rank, "l")
    for _ in range(20):  # perturb the factors (stays rank <= r)
        up = f.up + 1e-3 * torch.randn(f.up.shape, generator=g, dtype=torch.float64)
        down = f.down + 1e-3 * torch.randn(f.down.shape, generator=g, dtype=torch.float64)
        assert _objective(w, up @ down, xd, xc) >= best


def test_full_rank_is_least_squares():
    w, xd, xc = _problem()
    got = _product(build_method("svd_llm"), w, _stats(xc, xd), min(w.shape))
    # full rank here is min(m, n) = m = 9 < n: the unconstrained least-squares W' has rank <= m, so it is reached
    lstsq = torch.linalg.lstsq(xc, xd @ w.T).solution.T  # argmin ‖X_c W'ᵀ - X_d Wᵀ‖
    torch.testing.assert_close(got, lstsq, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(got, w @ (xd.T @ xc) @ torch.linalg.inv(xc.T @ xc), rtol=1e-8, atol=1e-8)


def test_shrinkage_solves_the_ridge_augmented_problem():
    """(1-λ)‖W X_dᵀ - W' X_cᵀ‖² + λ s ‖W - W'‖² (s = mean diag X_cᵀX_c) is the plain problem on stacked data."""
    w, xd, xc = _problem(seed=2)
    lam, rank = 0.2, 4
    s = float((xc.T @ xc).diagonal().mean())
    eye = torch.eye(xc.shape[1], dtype=torch.float64) * (lam * s) ** 0.5
    xd_aug, xc_aug = torch.cat([(1 - lam) ** 0.5 * xd, eye]), torch.cat([(1 - lam) ** 0.5 * xc, eye])
    got = _product(build_method("svd_llm", shrinkage=lam), w, _stats(xc, xd), rank)
    torch.testing.assert_close(got, _qr_optimum(w, xd_aug, xc_aug, rank), rtol=1e-9, atol=1e-9)


def test_cross_gram_precision_batches_and_reduce():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 40, 16, generator=g)
    r = x + 0.01 * torch.randn(x.shape, generator=g)
    whole = _stats(x, r)  # float32 activations: float32 GEMMs into the float64 sums
    exact = (r.double() - x.double()).reshape(-1, 16).T @ x.double().reshape(-1, 16)
    torch.testing.assert_close(whole.cross, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))
    parts = ChannelStats(16, needs={"gram", "cross"})
    for xb, rb in zip(x, r):
        parts.update(xb, "layer", rb)
    torch.testing.assert_close(parts.cross, exact, rtol=0, atol=1e-6 * float(exact.abs().max()))  # float32 GEMMs
    assert torch.equal(_stats(x, x.clone()).cross, torch.zeros(16, 16, dtype=torch.float64))
    stats = ActivationStats()
    stats.owner, stats.streams = {"layer": "layer"}, {"layer": parts}
    before = parts.cross.clone()
    stats.reduce_(lambda t, op: t * 3 if op == "sum" else t)  # three identical processes
    torch.testing.assert_close(parts.cross, 3 * before)
    back = ChannelStats.from_state_dict(parts.state_dict())
    assert back.needs == parts.needs and torch.equal(back.cross, parts.cross)


def test_cross_gram_refusals():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match="reference input"):
        ChannelStats(4, needs={"gram", "cross"}).update(x, "layer")
    with pytest.raises(ValueError, match="same tokens"):
        ChannelStats(4, needs={"gram", "cross"}).update(x, "layer", x[:5])
    with pytest.raises(ValueError, match="no dense-target form"):
        build_method("svd_llm_v2").decompose(torch.randn(3, 4), _stats(x.double(), x.double()), 2, "layer")


@pytest.mark.parametrize("alpha", [1.0, 0.5])
def test_sequential_dense_targets_end_to_end(alpha):
    """target_alpha α: the target is X_c + α (X_d - X_c) (α = 1: the dense model's)."""
    model, batches = _llama(), _batches()
    plain, target = copy.deepcopy(model), copy.deepcopy(model)
    compress_(plain, Recipe("svd_llm", ratio=0.4, calibration=SEQ), family=CausalLMSpec(model=plain), batches=batches)
    cal = {**SEQ, "dense_targets": True, "target_alpha": alpha}
    report = compress_(target, Recipe("svd_llm", ratio=0.4, calibration=cal), family=CausalLMSpec(model=target),
                       batches=batches)
    sp, st = plain.state_dict(), target.state_dict()
    assert sp.keys() == st.keys() and all(torch.isfinite(v).all() for v in st.values())
    first = [k for k in st if k.startswith("model.layers.0.")]
    assert first and all(torch.equal(sp[k], st[k]) for k in first)  # block 0: both streams are the same
    assert len(report.blocks) == 2 and all(0 < r["dense_error"] < 1 for r in report.blocks)
    assert report.blocks[0]["dense_error"] == pytest.approx(report.blocks[0]["output_error"], rel=1e-12)
    assert any(not torch.equal(sp[k], st[k]) for k in st if k.startswith("model.layers.1."))  # the streams differ
    # block 1: the closed form on X_c (block 0 compressed, block 1 dense) and X_d (the dense model)
    mixed = copy.deepcopy(model)
    mixed.model.layers[0] = copy.deepcopy(target.model.layers[0])
    names = [n for n, m in model.model.layers[1].named_modules() if isinstance(m, torch.nn.Linear)]
    names = [f"model.layers.1.{n}" for n in names]
    xc, xd = layer_inputs(mixed, names, batches), layer_inputs(model, names, batches)
    xd = {n: xc[n] + alpha * (xd[n] - xc[n]) for n in names}
    method = build_method("svd_llm")
    for name in names:
        layer, w = target.get_submodule(name), model.get_submodule(name).weight.detach()
        got = (layer.up.weight @ layer.down.weight).detach()
        want = _product(method, w, _stats(xc[name], xd[name]), layer.rank)
        # o_proj / down_proj see Grams of condition ~1e8 / singular (72 tokens): W' agrees to ~1e-9 relative there
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * float(want.abs().max()), msg=name)
        best = _objective(w, got, xd[name], xc[name])
        assert best == pytest.approx(_objective(w, want, xd[name], xc[name]), rel=1e-10)
        ours = plain.get_submodule(name)
        assert best <= _objective(w, ours.up.weight @ ours.down.weight, xd[name], xc[name]) * (1 + 1e-12)


def test_dense_targets_joint_qkv_runs():
    model, batches = _llama(), _batches()
    qkv = ["q_proj", "k_proj", "v_proj"]
    plain, target = copy.deepcopy(model), copy.deepcopy(model)
    for m, cal in ((plain, SEQ), (target, {**SEQ, "dense_targets": True})):
        compress_(m, Recipe("svd_llm", ratio=0.4, joint_qkv=True, targets=qkv, calibration=cal),
                  family=CausalLMSpec(model=m), batches=batches)
    sp, st = plain.state_dict(), target.state_dict()
    assert all(torch.isfinite(v).all() for v in st.values())
    assert all(torch.equal(sp[k], st[k]) for k in st if k.startswith("model.layers.0."))
    later = [k for k in st if k.startswith("model.layers.1.") and ".up." in k or "qkv_latent" in k and ".1." in k]
    assert later and any(not torch.equal(sp[k], st[k]) for k in later)


def test_dense_targets_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="mode: sequential only"):
        Recipe("svd_llm", calibration={"dense_targets": True})
    with pytest.raises(ValueError, match="propagate: compressed"):
        Recipe("svd_llm", calibration={**SEQ, "propagate": "dense", "dense_targets": True})
    with pytest.raises(ValueError, match="method: svd_llm only"):
        Recipe("svd_llm_v2", calibration={**SEQ, "dense_targets": True})
    with pytest.raises(ValueError, match="target_alpha must lie in"):
        Recipe("svd_llm", calibration={**SEQ, "dense_targets": True, "target_alpha": 0.0})
    with pytest.raises(ValueError, match="set dense_targets: true or leave"):
        Recipe("svd_llm", calibration={**SEQ, "target_alpha": 0.5})
    with pytest.raises(ValueError, match="stream_weights"):
        Recipe("svd_llm", calibration={**SEQ, "dense_targets": True, "stream_weights": True})
    recipe = Recipe("svd_llm", allocation="gradient", calibration={**SEQ, "dense_targets": True})
    assert recipe.all_at_once().calibration.dense_targets is False


def test_correct_dense_gives_kept_dense_matrices_the_least_squares_weight():
    """correct_dense: each matrix dense_above_break_even keeps dense becomes W + W E L⁻ᵀ L⁻¹, the full-rank
    closed form on the hooked inputs (block 0: E = 0, the weights stay bitwise); low-rank factors unchanged."""
    model, batches = _llama(), _batches(count=6)  # 144 tokens: every Gram positive definite at 96 channels
    fields = dict(ratio=0.1, allocation="greedy", dense_above_break_even=True)
    base, fixed = copy.deepcopy(model), copy.deepcopy(model)
    compress_(base, Recipe("svd_llm", **fields, calibration={**SEQ, "dense_targets": True}),
              family=CausalLMSpec(model=base), batches=batches)
    report = compress_(fixed, Recipe("svd_llm", **fields,
                                     calibration={**SEQ, "dense_targets": True, "correct_dense": True}),
                       family=CausalLMSpec(model=fixed), batches=batches)
    kept = [k for k, why in report.skipped.items() if "correct_dense" in why]
    assert any(k.startswith("model.layers.0.") for k in kept) and any(k.startswith("model.layers.1.") for k in kept)
    sb, sf = base.state_dict(), fixed.state_dict()
    assert all(torch.equal(sb[k], sf[k]) for k in sf if k.startswith("model.layers.0."))
    assert all(torch.equal(sb[k], sf[k]) for k in sf if ".up." in k or ".down." in k)
    mixed = copy.deepcopy(model)
    mixed.model.layers[0] = copy.deepcopy(fixed.model.layers[0])
    later = [k for k in kept if k.startswith("model.layers.1.")]
    xc, xd = layer_inputs(mixed, later, batches), layer_inputs(model, later, batches)
    for name in later:
        w, got = model.get_submodule(name).weight.detach(), fixed.get_submodule(name).weight.detach()
        want = w @ (xd[name].T @ xc[name]) @ torch.linalg.inv(xc[name].T @ xc[name])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-7 * float(want.abs().max()), msg=name)
        assert not torch.equal(got, w)
        assert _objective(w, got, xd[name], xc[name]) < _objective(w, w, xd[name], xc[name])


def test_correct_dense_refusals():
    with pytest.raises(ValueError, match="set dense_targets: true"):
        Recipe("svd_llm", allocation="greedy", dense_above_break_even=True, calibration={**SEQ, "correct_dense": True})
    with pytest.raises(ValueError, match="dense_above_break_even: true"):
        Recipe("svd_llm", calibration={**SEQ, "dense_targets": True, "correct_dense": True})
