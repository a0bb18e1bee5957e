"""Allocation ``kfac`` (:mod:`compression.allocation`): every singular triplet ranked by the Kronecker-factored
loss its removal costs, ``f̄ σ²`` in the output-Fisher-weighted whitened space.

- the identity it rests on: dropping triplet ``i`` changes ``tr(ΔWᵀ F_λ ΔW G)`` by exactly ``f̄ σ_i²`` (diagonal
  and full output Fisher; ``F_λ`` the damped Fisher, ``G`` the Gram);
- the ranking: a matrix whose outputs matter 100x more keeps more rank than its twin (``greedy`` splits them
  evenly); ``kfac`` is ``greedy`` on spectra multiplied by ``√f̄``; the budget holds;
- through the recipe: the sequential mode (its spectra pass on the dense model) gives the all-at-once ranks;
  without ``calibration.output_fisher`` it is refused naming the setting.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import Recipe, build_method, compress_
from compression.allocation import AllocationInputs, Matrix, run_allocation
from compression.output_fisher import OutputWeighted
from lightning_modules.specs import CausalLMSpec
from tests.test_output_fisher import _problem
from tests.test_sequential import SEQ, _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("full", [False, True])
def test_scaled_weighted_spectrum_is_the_kronecker_factored_loss(full):
    w, x, stats, fisher = _problem()
    if full:
        g = torch.randn(40, 12, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        fisher = g.T @ g
    lam = 0.2
    method = OutputWeighted(build_method("svd_llm"), {"w": fisher}, lam)
    diag = fisher if fisher.dim() == 1 else fisher.diagonal()
    mean = float(diag.mean())
    assert method.scales["w"] == pytest.approx(mean, rel=1e-15)
    f_lam = (1 - lam) * (torch.diag(fisher) if fisher.dim() == 1 else fisher) + lam * mean * torch.eye(12).double()
    mat, ctx = method.transformed(w, stats, "w")
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    left, right = method.unmap_left(u, ctx), method.unmap(vh, ctx)
    gram = x.T @ x
    for i in range(s.numel()):
        delta = s[i] * torch.outer(left[:, i], right[i])
        loss = float(torch.trace(delta.T @ f_lam @ delta @ gram))
        assert loss == pytest.approx(method.scales["w"] * float(s[i]) ** 2, rel=1e-9)


def _inputs(spectra, scales, ratio=0.5, **kw):
    matrices = {k: Matrix(k, (k,), (16,), 16) for k in spectra}
    return AllocationInputs(matrices, ratio, spectrum=spectra.__getitem__, loss_scale=scales, **kw)


def test_kfac_ranks_by_loss_not_energy():
    sigma = torch.linspace(4.0, 0.1, 16, dtype=torch.float64)
    spectra = {"a": sigma, "b": sigma.clone()}
    even = run_allocation("greedy", _inputs(spectra, None))
    assert even.ranks["a"] == even.ranks["b"] == 4  # 0.5 of 2 x 256 parameters at 32 a rank: 8 ranks
    kfac = run_allocation("kfac", _inputs(spectra, {"a": 100.0, "b": 1.0}))
    assert kfac.ranks["a"] > kfac.ranks["b"] >= 1
    assert sum(r * 32 for r in kfac.ranks.values()) <= 256
    # kfac is greedy on the loss scale's spectra: σ √f̄
    g = torch.Generator().manual_seed(0)
    spectra = {k: torch.rand(16, generator=g, dtype=torch.float64).sort(descending=True).values for k in "abcd"}
    scales = {k: float(v) for k, v in zip("abcd", torch.rand(4, generator=g, dtype=torch.float64) * 10)}
    scaled = {k: spectra[k] * scales[k] ** 0.5 for k in spectra}
    for keep_dense in (False, True):
        got = run_allocation("kfac", _inputs(spectra, scales, ratio=0.3), dense_above_break_even=keep_dense)
        want = run_allocation("greedy", _inputs(scaled, None, ratio=0.3), dense_above_break_even=keep_dense)
        assert got.ranks == want.ranks and got.dense == want.dense
    with pytest.raises(ValueError, match="set calibration.output_fisher"):
        run_allocation("kfac", _inputs(spectra, None))
    with pytest.raises(ValueError, match=r"no output Fisher scale for matrices \['d'\]"):
        run_allocation("kfac", _inputs(spectra, {k: 1.0 for k in "abc"}))


def _recipe(calibration=None):
    return Recipe("svd_llm", ratio=0.3, allocation="kfac", dense_above_break_even=True,
                  calibration={"progress": False, "gradient_batches": 2, "output_fisher": 0.25, **(calibration or {})})


def test_kfac_through_the_recipe_all_at_once_and_sequential():
    model, batches = _llama(), _batches(count=4)
    runs = {}
    for name, calibration in (("all", {}), ("seq", {**SEQ, "propagate": "dense"})):
        copy_ = copy.deepcopy(model)
        runs[name] = compress_(copy_, _recipe(calibration), family=CausalLMSpec(model=copy_), batches=batches)
    assert runs["seq"].plan["layers"] == runs["all"].plan["layers"]
    ranks = {k: v.get("rank") for k, v in runs["all"].plan["layers"].items()}
    assert len(set(ranks.values())) > 1  # heterogeneous
    greedy = Recipe("svd_llm", ratio=0.3, allocation="greedy", dense_above_break_even=True,
                    calibration={"progress": False, "gradient_batches": 2, "output_fisher": 0.25})
    copy_ = copy.deepcopy(model)
    plain = compress_(copy_, greedy, family=CausalLMSpec(model=copy_), batches=batches)
    assert plain.plan["layers"] != runs["all"].plan["layers"]  # the Fisher scales move the ranks
    with pytest.raises(ValueError, match="set calibration.output_fisher"):
        Recipe("svd_llm", ratio=0.3, allocation="kfac")


def test_kfac_through_the_lightning_stages(tmp_path):
    """The Lightning stages (all-at-once reallocation; sequential with dense propagation) take the same ranks
    from the output Fisher's scales and give the same model."""
    from tests.lightning_helpers import compress_tiny_llama

    def fit(calibration):
        recipe = Recipe("svd_llm", ratio=0.2, allocation="kfac", dense_above_break_even=True,
                        calibration={"progress": False, "output_fisher": 0.25, **calibration})
        return compress_tiny_llama(tmp_path, recipe)

    once = fit({})
    seq = fit({"mode": "sequential", "propagate": "dense"})
    assert seq.plan["layers"] == once.plan["layers"]
    assert len({v.get("rank") for v in once.plan["layers"].values()}) > 1
    for key, value in once.model.state_dict().items():
        torch.testing.assert_close(seq.model.state_dict()[key], value, rtol=0, atol=1e-6)
