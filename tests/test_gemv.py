"""One-token products as multiply-reduce kernels (compression.gemv): which products are rewritten, and the
rewritten graph computes what the BLAS one does."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.backends.common import aot_autograd
from torch.fx.experimental.proxy_tensor import make_fx

from compression import Recipe, compress_
from compression.fused import FastLowRankLinear, compile_forward_, optimize_for_inference_
from compression.gemv import decompose_gemv
from compression.graph_cse import merge_common_subexpressions
from tests.conftest import make_tiny_llama
from tests.test_fused import FixedTimer, decode_against_eager, tokens

aten = torch.ops.aten
GEMMS = (aten.mm.default, aten.addmm.default)


def gemms(gm) -> int:
    return sum(n.op == "call_function" and n.target in GEMMS for n in gm.graph.nodes)


def layers(x, w, b, u):
    return F.linear(F.linear(x, w, b), u)  # a biased product (addmm) feeding a plain one (mm)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("shape", [(1, 24), (1, 1, 24)])
def test_one_row_products_become_reductions_with_the_same_values(dtype, shape):
    g = torch.Generator().manual_seed(0)
    x, w, b, u = (torch.randn(*s, generator=g, dtype=dtype) for s in (shape, (40, 24), (40,), (7, 40)))
    gm = make_fx(layers, tracing_mode="fake")(x, w, b, u)
    assert gemms(gm) == 2
    assert decompose_gemv(gm.graph) == 2
    gm.recompile()
    assert gemms(gm) == 0
    assert sum(n.target is aten.sum.dim_IntList for n in gm.graph.nodes) == 2
    got, want = gm(x, w, b, u), layers(x, w, b, u)
    assert got.shape == want.shape
    tol = 1e-6 if dtype == torch.float32 else 1e-14  # another summation order, nothing else
    assert float((got - want).norm() / want.norm()) <= tol


@pytest.mark.parametrize("case", ["two rows", "dynamic rows", "half precision", "scaled addmm"])
def test_products_the_rewrite_does_not_own_are_left_to_blas(case):
    """More than one row (prefill), a row count only known at run time, a dtype outside float32/64, an
    ``addmm`` with ``alpha``/``beta``: left as they are."""
    x, w, b, u = torch.randn(1, 24), torch.randn(40, 24), torch.randn(40), torch.randn(7, 40)
    if case == "two rows":
        gm = make_fx(layers, tracing_mode="fake")(torch.randn(2, 24), w, b, u)
    elif case == "dynamic rows":
        gm = make_fx(layers, tracing_mode="symbolic")(torch.randn(3, 24), w, b, u)
    elif case == "half precision":
        gm = make_fx(layers, tracing_mode="fake")(*(t.to(torch.bfloat16) for t in (x, w, b, u)))
    else:
        gm = make_fx(lambda x, w, b: torch.addmm(b, x, w.t(), beta=0.5), tracing_mode="fake")(x, w, b)
    before = gemms(gm)
    assert before >= 1
    assert decompose_gemv(gm.graph) == 0 and gemms(gm) == before


def test_compiled_decode_of_an_optimized_model_has_no_blas_product_left():
    """Through dynamo and AOTAutograd as ``torch.compile(dynamic=True)`` traces the 1-token step (a backend that
    applies the shared-product merge and the rewrite and runs the graph eagerly: seconds, not inductor's
    minutes). Every product of the tiny LLaMA's step is rewritten: 11 per block (the stacked q/k/v and gate/up
    downs, their 5 ups, o's and down's two factors) and the LM head. The stacked downs count only because
    ``SharedDown`` marks its weight static: a dynamic width would leave them to BLAS. The logits match the
    eager unfused model."""
    seen = []

    def rewrite(gm, example_inputs):
        merge_common_subexpressions(gm.graph)
        seen.append((decompose_gemv(gm.graph), gemms(gm)))
        gm.recompile()
        return gm

    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    ref = copy.deepcopy(model)
    report = optimize_for_inference_(model, batch_tokens=1, example={"input_ids": tokens(1, 8)}, timer=FixedTimer())
    assert len(report.groups) == 4 and not report.merged
    model.forward = torch.compile(model.forward, dynamic=True, backend=aot_autograd(fw_compiler=rewrite))
    error, graphs = decode_against_eager(model, ref)
    assert graphs == 1 and seen == [(2 * 11 + 1, 0)]
    assert error <= 1e-5


def test_gemv_option_lays_out_for_the_kernels_and_refuses_what_it_cannot_do(monkeypatch):
    """``gemv=True``: the BLAS timer chooses nothing (a timer preferring transposed factors and dense q/o/down
    products is ignored): row-major factors, no padding, nothing merged; the pass reaches inductor as the
    post-grad post pass. Without ``compile`` or at more than one token it is refused."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: seen.append(kwargs) or fn)
    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    with pytest.raises(ValueError, match="pass compile=True"):
        optimize_for_inference_(copy.deepcopy(model), timer=FixedTimer(), gemv=True)
    with pytest.raises(ValueError, match="batch_tokens=1"):
        optimize_for_inference_(copy.deepcopy(model), batch_tokens=16, timer=FixedTimer(), compile=True, gemv=True)
    cheap = {(64, 64), (64, 96)}  # q, o and down measured 10x cheaper dense: merged back without gemv
    merged = optimize_for_inference_(copy.deepcopy(model), example={"input_ids": tokens(1, 8)},
                                     timer=FixedTimer(cheap_dense=cheap))
    assert len(merged.merged) == 6
    report = optimize_for_inference_(model, example={"input_ids": tokens(1, 8)}, compile=True, gemv=True,
                                     timer=FixedTimer(cheap_dense=cheap))
    fast = [m for m in model.modules() if isinstance(m, FastLowRankLinear)]
    assert not report.merged and not report.padding and len(fast) == 14
    assert all(m.up.weight.is_contiguous() and (m.shared is None or m.shared.weight.is_contiguous()) for m in fast)
    compile_forward_(make_tiny_llama(), gemv=False)
    assert [sorted(k["options"]) for k in seen] == [
        ["post_grad_custom_post_pass", "post_grad_custom_pre_pass"], ["post_grad_custom_pre_pass"]]


@pytest.mark.slow
def test_inductor_gemv_decode_matches_the_eager_unfused_model(monkeypatch):
    """With inductor's generated kernels: the pass rewrites the step's 23 products, and the float32 reductions
    (another summation order than BLAS) stay within 1e-5 of the eager unfused model."""
    import compression.gemv as gemv

    counts, rewrite = [], gemv.decompose_gemv
    monkeypatch.setattr(gemv, "decompose_gemv", lambda graph: counts.append(rewrite(graph)) or counts[-1])
    model = make_tiny_llama()
    compress_(model, Recipe("svd", ratio=0.4))
    ref = copy.deepcopy(model)
    report = optimize_for_inference_(model, batch_tokens=1, example={"input_ids": tokens(1, 8)}, timer=FixedTimer(),
                                     compile=True, gemv=True)
    with torch._inductor.config.patch(fx_graph_cache=False):  # a cached graph would skip the pass
        error, graphs = decode_against_eager(model, ref)
    assert graphs == 1 and counts == [23] and report.compiled
    assert error <= 1e-5

