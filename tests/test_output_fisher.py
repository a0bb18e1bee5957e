"""Output-side Fisher weighting (:mod:`compression.output_fisher`).

- the collected ``f`` is the sum over tokens of the squared loss gradient at each layer's output, checked
  against ``torch.autograd.grad`` of the same loss with respect to the captured outputs;
- the weighted truncation is optimal for ``‖D (W - W') Xᵀ‖_F`` (its reported loss equals it, and it beats
  the unweighted factors in that norm while losing to them in the unweighted one), up = ``D⁻¹ U Σ^(1-β)``;
- ``λ = 1`` is the unweighted method to rounding; a matrix without a Fisher vector is refused by name;
- the gradient importance of the weighted bases is the first-order loss change of dropping each component;
- ``calibration.output_fisher``: compress_ gives the model built from the sums of its gradient batches by hand,
  damping 1 the unweighted model, the sequential mode with dense propagation the all-at-once model; what cannot
  work is refused naming the setting.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import Recipe, build_method, collect_stats, compress_
from compression.api import prepare
from compression.gradient_allocation import gradient_importance, lm_loss
from compression.output_fisher import OutputWeighted, output_fisher, row_weights
from compression.pipeline import CompressionPipeline
from compression.sequential import SequentialRun
from compression.stats import ChannelStats
from lightning_modules.specs import CausalLMSpec
from tests.conftest import make_tiny_llama
from tests.test_sequential import SEQ, _assert_same, _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _problem(m=12, n=8, tokens=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(m, n, generator=g, dtype=torch.float64)
    x = torch.randn(tokens, n, generator=g, dtype=torch.float64) * torch.linspace(0.2, 3.0, n, dtype=torch.float64)
    stats = ChannelStats(n, needs={"gram"})
    stats.update(x)
    fisher = torch.rand(m, generator=g, dtype=torch.float64) ** 3 * 10  # spans orders of magnitude
    return w, x, stats, fisher


def test_collected_fisher_is_the_summed_squared_output_gradient():
    model = make_tiny_llama().double()
    names = ["model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj", "model.layers.1.mlp.up_proj"]
    batches = [{"input_ids": torch.randint(0, 128, (2, 10))} for _ in range(3)]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    fisher, count = output_fisher(model, names, batches, lm_loss)
    assert count == 3
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert all(p.grad is None for p in model.parameters())
    expected = {n: torch.zeros(model.get_submodule(n).out_features, dtype=torch.float64) for n in names}
    for batch in batches:  # reference: capture each output, differentiate the loss with respect to it
        outs = {}
        handles = [model.get_submodule(n).register_forward_hook(
            lambda _m, _i, o, n=n, outs=outs: outs.__setitem__(n, o)) for n in names]
        model.model.embed_tokens.weight.requires_grad_(True)
        loss = lm_loss(model, batch)
        grads = torch.autograd.grad(loss, [outs[n] for n in names])
        model.model.embed_tokens.weight.requires_grad_(flags["model.embed_tokens.weight"])
        for h in handles:
            h.remove()
        for n, gr in zip(names, grads):
            expected[n] += gr.reshape(-1, gr.shape[-1]).square().sum(0)
    for n in names:
        torch.testing.assert_close(fisher[n], expected[n], rtol=1e-10, atol=0)
        assert float(fisher[n].min()) > 0


def test_weighted_truncation_is_optimal_in_the_weighted_norm():
    w, x, stats, fisher = _problem()
    lam, rank = 0.2, 4
    d = row_weights(fisher, lam, "w")
    torch.testing.assert_close(d.square().mean(), torch.tensor(1.0, dtype=torch.float64))  # scale-free
    weighted = OutputWeighted(build_method("svd_llm"), {"w": fisher}, lam).decompose(w, stats, rank, "w")
    plain = build_method("svd_llm").decompose(w, stats, rank, "w")
    w_weighted, w_plain = weighted.up @ weighted.down, plain.up @ plain.down

    def err(approx, rows):
        return float((rows[:, None] * (w - approx) @ x.T).norm())

    ones = torch.ones_like(d)
    assert err(w_weighted, d) == pytest.approx(weighted.truncation_loss, rel=1e-9)
    assert err(w_plain, ones) == pytest.approx(plain.truncation_loss, rel=1e-9)
    assert err(w_weighted, d) < 0.95 * err(w_plain, d)  # optimal in its own norm (8.7 % better here)
    assert err(w_plain, ones) < err(w_weighted, ones)
    # Eckart-Young in the weighted space: D W L's tail singular values
    chol = torch.linalg.cholesky(x.T @ x)
    tail = torch.linalg.svdvals(d[:, None] * w @ chol)[rank:]
    assert weighted.truncation_loss == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-9)


def test_no_damping_weight_is_the_plain_method_and_missing_keys_are_refused():
    w, _, stats, fisher = _problem()
    plain = build_method("svd_llm").decompose(w, stats, 5, "w")
    same = OutputWeighted(build_method("svd_llm"), {"w": fisher}, 1.0).decompose(w, stats, 5, "w")
    torch.testing.assert_close(same.up @ same.down, plain.up @ plain.down, rtol=0, atol=1e-12)
    method = OutputWeighted(build_method("svd_llm"), {"w": fisher}, 0.5)
    with pytest.raises(KeyError, match="no output Fisher for matrix 'other'"):
        method.decompose(w, stats, 5, "other")
    with pytest.raises(ValueError, match="12 outputs, its output Fisher 3"):
        OutputWeighted(build_method("svd_llm"), {"w": fisher[:3]}, 0.5).decompose(w, stats, 5, "w")
    with pytest.raises(ValueError, match=r"damping λ must lie in \(0, 1\]"):
        OutputWeighted(build_method("svd_llm"), {"w": fisher}, 0.0)
    with pytest.raises(ValueError, match="output Fisher is zero"):
        OutputWeighted(build_method("svd_llm"), {"w": torch.zeros(12)}, 0.5)


def _loss64(model, batch):
    """Next-token loss in float64 (transformers' loss casts the logits to float32: too coarse for a difference)."""
    ids = batch["input_ids"]
    logits = model(input_ids=ids).logits
    return torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))


def test_importance_of_weighted_bases_is_the_first_order_loss_change():
    model = make_tiny_llama().double()
    name = "model.layers.1.mlp.gate_proj"
    layer = model.get_submodule(name)
    batch = {"input_ids": torch.randint(0, 128, (4, 24))}  # 96 tokens > 64 channels: no jitter
    stats = collect_stats(model, [name], [batch], needs={"gram"})
    fisher, _ = output_fisher(model, [name], [batch], _loss64)
    method = OutputWeighted(build_method("svd_llm"), {name: fisher[name]}, 0.3)
    importance = gradient_importance(model, [name], [batch], _loss64, method, stats)[name]
    # dropping component i changes W by -σ_i (D⁻¹ u_i) (v_iᵀ L⁻¹): compare with a finite difference
    mat, ctx = method.transformed(layer.weight.detach().double(), stats[name], name)
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    left, right = method.unmap_left(u, ctx), method.unmap(vh, ctx)
    for i in (0, 5, 40):  # central difference (the attention softmax runs in float32: steps of 1e-2)
        step = 1e-2
        with torch.no_grad():
            delta = step * s[i] * torch.outer(left[:, i], right[i])
            layer.weight -= delta
            minus = float(_loss64(model, batch))
            layer.weight += 2 * delta
            plus = float(_loss64(model, batch))
            layer.weight -= delta
        assert ((minus - plus) / (2 * step)) ** 2 == pytest.approx(float(importance[i]), rel=1e-2)


# -- the recipe entry point: calibration.output_fisher -------------------------------------------------------
def _recipe(calibration=None, **fields):
    return Recipe("svd_llm", ratio=0.3, allocation="gradient", dense_above_break_even=True,
                  calibration={"progress": False, "gradient_batches": 2, **(calibration or {})}, **fields)


def _compress(model, batches, calibration=None, **kw):
    model = copy.deepcopy(model)
    report = compress_(model, _recipe(calibration), family=CausalLMSpec(model=model), batches=batches, **kw)
    return model, report


def test_compress_weights_every_matrix_by_the_dense_output_fisher():
    model, batches = _llama(), _batches(count=4)
    weighted, rw = _compress(model, batches, {"output_fisher": 0.25})
    plain, rp = _compress(model, batches)
    # the reference: the sums of the 2 gradient batches (evenly spaced: the first and the last), then the same
    # statistics, importances and truncation with the wrapped method
    names = [n for n in rp.plan["layers"]] + [n for n in CausalLMSpec(model=model).default_targets(model)
                                              if n not in rp.plan["layers"]]
    fisher, count = output_fisher(model, names, [batches[0], batches[-1]], lm_loss)
    assert count == 2
    ref, rr = _compress(model, batches, {"output_fisher": 0.25}, fisher=fisher,
                        importances=prepare(copy.deepcopy(model), _recipe({"output_fisher": 0.25}),
                                            family=CausalLMSpec(model=model), batches=batches,
                                            fisher=fisher).importances)
    _assert_same(weighted, ref, rw, rr)
    assert rw.plan["layers"] != rp.plan["layers"]  # other bases, other importances: other ranks here
    # damping 1: every row weight is 1 -- the plain compression to rounding
    same, rs = _compress(model, batches, {"output_fisher": 1.0})
    assert rs.plan["layers"] == rp.plan["layers"]
    for key, value in plain.state_dict().items():
        torch.testing.assert_close(same.state_dict()[key], value, rtol=0, atol=1e-9, msg=key)


def test_sequential_dense_propagation_gives_the_all_at_once_weighted_model():
    model, batches = _llama(), _batches(count=4)
    a, ra = _compress(model, batches, {"output_fisher": 0.25})
    d, rd = _compress(model, batches, {**SEQ, "propagate": "dense", "output_fisher": 0.25})
    _assert_same(a, d, ra, rd)
    c, rc = _compress(model, batches, {**SEQ, "output_fisher": 0.25})
    assert rc.plan["layers"] == ra.plan["layers"]


def test_output_fisher_refusals_name_what_to_change():
    with pytest.raises(ValueError, match=r"damping λ in \(0, 1\]"):
        _recipe({"output_fisher": 1.5})
    with pytest.raises(ValueError, match="method: null has none"):
        Recipe(None, calibration={"output_fisher": 0.5}, quantization={"weight_bits": 8})
    with pytest.raises(ValueError, match="stream_weights never holds it whole"):
        Recipe("svd_llm", allocation="v2", calibration={"mode": "sequential", "stream_weights": True,
                                                        "output_fisher": 0.5})
    model, batches = _llama(), _batches(count=4)
    family = CausalLMSpec(model=model)
    importances = prepare(copy.deepcopy(model), _recipe(), family=family, batches=batches).importances
    for calibration in ({}, SEQ):
        with pytest.raises(ValueError, match="pass the fisher= sums they were computed with"):
            compress_(copy.deepcopy(model), _recipe({**calibration, "output_fisher": 0.5}), family=family,
                      batches=batches, importances=importances)
    with pytest.raises(ValueError, match="calibration.output_fisher is not set"):
        compress_(copy.deepcopy(model), _recipe(), family=family, batches=batches, fisher={"x": torch.ones(3)})
    pipe = CompressionPipeline(model, _recipe({**SEQ, "output_fisher": 0.5}), family)
    with pytest.raises(ValueError, match="pass fisher="):
        SequentialRun(pipe).run(batches, importances)
    pipe = CompressionPipeline(model, _recipe({"output_fisher": 0.5}), family)
    pipe.collect(batches)
    with pytest.raises(RuntimeError, match="run the output Fisher stage"):
        pipe.importance(batches)
    with pytest.raises(ValueError, match="output Fisher missing for 14 targeted layers"):
        pipe.set_output_fisher({})
    sums = pipe.output_fisher(batches[:1])
    pipe.set_output_fisher(sums)
    with pytest.raises(RuntimeError, match="stage 'fisher' already ran"):
        pipe.set_output_fisher(sums)
    first = CompressionPipeline(model, _recipe({"output_fisher": 0.5}), family)
    first.set_output_fisher(sums)  # before the statistics too (the sequential mode's order)
    first.collect(batches)
    assert first.done == ["fisher", "statistics"]
    again = CompressionPipeline(model, _recipe({"output_fisher": 0.5}), family)
    again.done.append("importance")  # as if the importance had run unweighted
    with pytest.raises(RuntimeError, match=r"stage 'fisher' must run before \['importance'\]"):
        again.set_output_fisher(sums)


def test_lightning_stages_weight_by_the_output_fisher(tmp_path):
    """Through the Lightning stages: all-at-once (the reallocation stage sets the weights) and sequential with
    dense propagation (the weights come from the dense model first) give the same model, unlike no weighting."""
    from tests.lightning_helpers import compress_tiny_llama

    def fit(calibration):
        return compress_tiny_llama(tmp_path, Recipe("svd_llm", ratio=0.2, allocation="gradient",
                                                    dense_above_break_even=True, calibration=calibration))

    weighted = fit({"progress": False, "output_fisher": 0.25})
    seq = fit({"mode": "sequential", "propagate": "dense", "progress": False, "output_fisher": 0.25})
    plain = fit({"progress": False})
    assert seq.plan["layers"] == weighted.plan["layers"] != plain.plan["layers"]
    for key, value in weighted.model.state_dict().items():
        torch.testing.assert_close(seq.model.state_dict()[key], value, rtol=0, atol=1e-6)


def test_full_output_fisher_is_the_kronecker_factored_optimum():
    """``output_fisher_full``: the collected matrix is Σ g gᵀ (its diagonal the diagonal sums); the truncation
    minimises tr(ΔWᵀ F_λ ΔW G) and reports its square root; a diagonal F gives the diagonal method."""
    model = make_tiny_llama().double()
    names = ["model.layers.0.self_attn.k_proj", "model.layers.1.mlp.gate_proj"]
    batches = [{"input_ids": torch.randint(0, 128, (2, 10))} for _ in range(2)]
    full, _ = output_fisher(model, names, batches, lm_loss, full=True)
    diag, _ = output_fisher(model, names, batches, lm_loss)
    for n in names:
        assert full[n].shape == (diag[n].numel(),) * 2
        torch.testing.assert_close(full[n].diagonal(), diag[n], rtol=1e-10, atol=0)
        torch.testing.assert_close(full[n], full[n].T, rtol=1e-12, atol=0)
    w, x, stats, _ = _problem()
    g = torch.Generator().manual_seed(3)
    grads = torch.randn(40, 12, generator=g, dtype=torch.float64) * torch.linspace(0.1, 2.0, 12, dtype=torch.float64)
    fisher, lam, rank = grads.T @ grads, 0.1, 4
    f = fisher.double()
    f_lam = (1 - lam) * f / float(f.diagonal().mean()) + lam * torch.eye(12, dtype=torch.float64)
    factors = OutputWeighted(build_method("svd_llm"), {"w": fisher}, lam).decompose(w, stats, rank, "w")
    delta = w - factors.up @ factors.down
    gram = x.T @ x
    loss = float(torch.trace(delta.T @ f_lam @ delta @ gram)) ** 0.5
    assert loss == pytest.approx(factors.truncation_loss, rel=1e-9)
    root = torch.linalg.cholesky(f_lam)
    tail = torch.linalg.svdvals(root.T @ w @ torch.linalg.cholesky(gram))[rank:]
    assert factors.truncation_loss == pytest.approx(float(tail.square().sum().sqrt()), rel=1e-9)
    method = build_method("svd_llm")
    plain = OutputWeighted(method, {"w": fisher.diagonal().clone()}, lam).decompose(w, stats, rank, "w")
    as_matrix = OutputWeighted(method, {"w": torch.diag(fisher.diagonal())}, lam).decompose(w, stats, rank, "w")
    torch.testing.assert_close(as_matrix.up @ as_matrix.down, plain.up @ plain.down, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="set output_fisher"):
        _recipe({"output_fisher_full": True})


def test_joint_groups_stack_their_members_fisher():
    """Joint q/k/v: the group's weights are its members' sums stacked in member order (block-diagonal when
    full); the joint factors are those of the weighted stacked SVD."""
    from compression.joint import decompose_joint

    model, batches = _llama(), _batches(count=4)
    for full in (False, True):
        calibration = {"output_fisher": 0.25, "output_fisher_full": full, "gradient_batches": 2, "progress": False}
        recipe = Recipe("svd_llm", ratio=0.3, joint_qkv=True, targets=["q_proj", "k_proj", "v_proj"],
                        calibration=calibration)
        pipe = prepare(copy.deepcopy(model), recipe, family=CausalLMSpec(model=model), batches=batches)
        key = next(k for k, m in pipe.matrices.items() if m.joint)
        members = pipe.matrices[key].members
        sums = [pipe.output_fisher_sums[n] for n in members]
        stacked = torch.block_diag(*sums) if full else torch.cat(sums)
        ref = OutputWeighted(build_method("svd_llm"), {key: stacked}, 0.25)
        weights, stats = pipe._inputs(key)
        got = decompose_joint(pipe.method, weights, stats, key, 5)
        want = decompose_joint(ref, weights, stats, key, 5)
        for a, b in zip(got.ups, want.ups):
            torch.testing.assert_close(a, b, rtol=0, atol=0)
        assert got.truncation_loss == want.truncation_loss
        assert stacked.shape[0] == sum(model.get_submodule(n).out_features for n in members)
