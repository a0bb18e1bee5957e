"""Common-subexpression elimination for compiled inference graphs: merges only what computes the same value."""

from __future__ import annotations

import torch
from torch.fx.experimental.proxy_tensor import make_fx

from compression.graph_cse import merge_common_subexpressions

aten = torch.ops.aten


def count(gm, op):
    return sum(n.op == "call_function" and n.target == op for n in gm.graph.nodes)


def test_repeated_shared_products_become_one_and_the_outputs_do_not_change():
    """Three layers reading one stacked down product (as q/k/v do): one GEMM after the pass, same outputs."""

    def f(x, w, u):
        z = [torch.nn.functional.linear(x, w) for _ in range(3)]
        return [torch.nn.functional.linear(z[i][..., 2 * i:2 * i + 2], u) for i in range(3)]

    x, w, u = torch.randn(5, 8), torch.randn(6, 8), torch.randn(4, 2)
    gm = make_fx(f)(x, w, u)
    gemms = count(gm, aten.mm.default)
    assert gemms == 6
    want = gm(x, w, u)
    assert merge_common_subexpressions(gm.graph) >= 2
    gm.recompile()
    assert count(gm, aten.mm.default) == 4
    assert all(torch.equal(a, b) for a, b in zip(gm(x, w, u), want))


def test_a_mutation_between_two_reads_keeps_both():
    """A graph that writes ``x`` in place between two identical products (a functionalized graph's
    ``copy_`` into a mutated input): the second product reads another value and is kept."""
    graph = torch.fx.Graph()
    x, w = graph.placeholder("x"), graph.placeholder("w")
    first = graph.call_function(aten.mm.default, (x, w))
    graph.call_function(aten.add_.Tensor, (x, 1.0))
    second = graph.call_function(aten.mm.default, (x, w))
    third = graph.call_function(aten.mm.default, (x, w))  # same region as the second: merged
    graph.output((first, second, third))
    gm = torch.fx.GraphModule(torch.nn.Module(), graph)
    assert merge_common_subexpressions(gm.graph) == 1
    gm.recompile()
    assert count(gm, aten.mm.default) == 2
    x0, w0 = torch.randn(3, 4), torch.randn(4, 2)
    a, b, c = gm(x0.clone(), w0)
    assert torch.equal(a, x0 @ w0) and torch.equal(b, (x0 + 1.0) @ w0) and torch.equal(c, b)


def test_random_draws_stay_separate():
    def f(x):
        return torch.rand_like(x), torch.rand_like(x)

    gm = make_fx(f)(torch.zeros(16))
    assert merge_common_subexpressions(gm.graph) == 0
    gm.recompile()
    a, b = gm(torch.zeros(16))
    assert not torch.equal(a, b)
