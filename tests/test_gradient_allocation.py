"""Gradient-based cross-layer rank allocation: first-order scores, budget never exceeded, end to end."""

from __future__ import annotations

import pytest
import torch

from compression import (
    Recipe,
    collect_stats,
    compress_,
    eligible_linears,
    find_joint_groups,
    gradient_allocation,
    gradient_importance,
)
from compression.gradient_allocation import lm_loss
from compression.methods import build_method
from models.layouts import layout_of
from tests.conftest import compress_joint, make_tiny_llama


def calib(model, batches):
    return collect_stats(model, list(eligible_linears(model)[0]), batches)


@pytest.mark.parametrize("method", ["svd", "asvd", "svd_llm_v2"])
def test_score_is_the_first_order_loss_change(method):
    """σ_i u_iᵀ G r_i equals -d/dt L(W - t σ_i u_i r_iᵀ) at t = 0 (central differences, all float64)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(12, 20), torch.nn.Tanh(), torch.nn.Linear(20, 3)).double()
    batches = [(torch.randn(16, 12, dtype=torch.float64) * torch.linspace(0.1, 3, 12, dtype=torch.float64),
                torch.randn(16, 3, dtype=torch.float64)) for _ in range(3)]

    def loss_fn(m, batch):
        return torch.nn.functional.mse_loss(m(batch[0]), batch[1])

    stats = collect_stats(model, ["0"], batches, forward=lambda m, b: m(b[0]))
    imp = gradient_importance(model, ["0"], batches, loss_fn, method, stats)["0"]
    handler = build_method(method)
    layer = model[0]
    w0 = layer.weight.detach().clone()
    mat, ctx = handler.transformed(w0, stats["0"], "0")
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    right = handler.unmap(vh, ctx)
    eps = 1e-5
    for i in (0, 4, 11):
        direction = s[i] * torch.outer(u[:, i], right[i])
        squares = []
        for batch in batches:
            losses = []
            for t in (eps, -eps):
                with torch.no_grad():
                    layer.weight.copy_(w0 - t * direction)
                    losses.append(float(loss_fn(model, batch)))
            squares.append(((losses[0] - losses[1]) / (2 * eps)) ** 2)
        assert float(imp[i]) == pytest.approx(sum(squares) / len(squares), rel=1e-5)
    with torch.no_grad():
        layer.weight.copy_(w0)
    assert all(p.requires_grad for p in model.parameters()) and all(p.grad is None for p in model.parameters())


def test_importance_on_tiny_llama_restores_flags(token_batches):
    model = make_tiny_llama()
    model.model.embed_tokens.weight.requires_grad_(False)
    stats = calib(model, token_batches)
    imp = gradient_importance(model, ["model.layers.0.mlp.up_proj"], token_batches[:2], lm_loss, "svd_llm_v2", stats)
    assert imp["model.layers.0.mlp.up_proj"].shape == (64,) and (imp["model.layers.0.mlp.up_proj"] > 0).all()
    assert not model.model.embed_tokens.weight.requires_grad
    assert all(p.grad is None for p in model.parameters())


def test_allocation_never_exceeds_budget():
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        shapes = {f"m{j}": (int(torch.randint(4, 40, (1,), generator=g)), int(torch.randint(4, 40, (1,), generator=g)))
                  for j in range(5)}
        imp = {k: torch.rand(min(s), generator=g, dtype=torch.float64) ** 4 for k, s in shapes.items()}
        dense = sum(m * n for m, n in shapes.values())
        min_cost = sum(m + n for m, n in shapes.values())
        for ratio in (0.1, 0.3, 0.5, 0.7, 0.9):
            budget = int((1 - ratio) * dense)
            if budget < min_cost:
                with pytest.raises(ValueError, match="cannot keep"):
                    gradient_allocation(imp, shapes, budget=budget)
                continue
            for mode in ("count", "subset"):
                a = gradient_allocation(imp, shapes, budget=budget, mode=mode)
                used = sum(len(a.components[k]) * sum(shapes[k]) for k in shapes)
                assert used == a.used <= budget == a.budget
                assert all(a.ranks[k] >= 1 for k in shapes)
                assert all(a.ranks[k] == len(a.components[k]) <= min(shapes[k]) for k in shapes)
                # greedy with skipping: nothing left out would still fit
                left = [k for k in shapes if a.ranks[k] < min(shapes[k])]
                assert all(sum(shapes[k]) > budget - used for k in left)


def test_selection_prefers_important_components():
    shapes = {"a": (10, 10), "b": (10, 10)}
    imp = {"a": torch.tensor([9.0, 8, 7, 6, 5, 0, 0, 0, 0, 0]), "b": torch.tensor([4.0, 0, 3, 0, 0, 0, 0, 0, 0, 1])}
    a = gradient_allocation(imp, shapes, budget=8 * 20, mode="subset")
    assert a.components == {"a": [0, 1, 2, 3, 4], "b": [0, 2, 9]}
    c = gradient_allocation(imp, shapes, budget=8 * 20, mode="count")
    assert c.ranks == {"a": 5, "b": 3} and c.components["b"] == [0, 1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        gradient_allocation(imp, shapes)


def test_end_to_end_joint_and_per_matrix_respect_the_budget(token_batches):
    model = make_tiny_llama()
    stats = calib(model, token_batches)
    groups = find_joint_groups(model, layout_of(model))
    imp = gradient_importance(model, groups, token_batches, lm_loss, "svd_llm_v2", stats)
    shapes = {g: (128, 64) for g in groups}
    alloc = gradient_allocation(imp, shapes, ratio=0.4, mode="subset")
    assert any(c != list(range(len(c))) for c in alloc.components.values())  # not just the leading triplets
    report = compress_joint(model, "svd_llm_v2", stats, ratio=0.4, allocation="gradient", components="chosen",
                            importances=imp)
    assert report.targeted_params_after <= alloc.budget == int(0.6 * 2 * 128 * 64)
    assert {r.name[:-4]: r.rank for r in report.layers} == alloc.ranks

    dense = make_tiny_llama()
    names = [n for n in eligible_linears(dense)[0] if "mlp" in n]
    imp = gradient_importance(dense, names, token_batches[:2], lm_loss, "svd_llm_v2", stats)
    shapes = {n: tuple(dense.get_submodule(n).weight.shape) for n in names}
    alloc = gradient_allocation(imp, shapes, ratio=0.5)
    report = compress_(dense, Recipe("svd_llm_v2", ratio=0.5, targets=["mlp.*"], allocation="gradient"), stats,
                       importances=imp)
    assert {r.name: r.rank for r in report.layers} == alloc.ranks
    assert report.targeted_params_after == alloc.used <= alloc.budget
    assert len(set(alloc.ranks.values())) > 1  # heterogeneous
