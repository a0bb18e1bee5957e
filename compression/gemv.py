"""One-token products as generated multiply-reduce kernels under ``torch.compile`` on a CPU.

At one token a linear layer is a matrix-vector product: every weight is read once for two FLOPs,
so the product can run no faster than memory streams the weight. torch hands it to BLAS
(``aten.mm`` of a ``1 x k`` row), and BLAS does not always stream well. On the 2-core AMD EPYC
this was measured on (torch 2.14, MKL, float32), 30 layers' worth of SmolLM2-135M's batch-1
products ran at 12.6 GB/s (dense shapes) and 9.7 GB/s (the ratio-0.6 factors), one or two threads
alike. One thread summed a 256 MiB tensor at 34 GB/s. The same products as inductor-generated
reductions ran at 31.5 and 25.5 GB/s.

:func:`decompose_gemv` rewrites every ``mm(a, b)`` / ``addmm(c, a, b)`` of an inductor post-grad
graph whose ``a`` is a single row (static) on the CPU, in float32 or float64, into
``sum(a[:, :, None] * b[None], 1)`` (``+ c``). Inductor fuses the multiply into the reduction, so
no ``k x n`` product is ever stored. It generates one vectorized, threaded reduction kernel per
product, and can fuse the norm or the activation around it into the same kernel. Products with
more rows (prefill), a dynamic row count, other dtypes or devices are left to BLAS. Inductor has
a similar pass (``post_grad_fusion_options={"decompose_mm_pass": {}}``). It is not used here
because its size limits are module globals read once at import: without patching them it leaves
the LM head to BLAS, and it skips any product whose weight has a dynamic size.

The result is the same dot products summed in another order: float32 rounding (relative logit
differences of about 1e-6 in the SmolLM2 probe), not bit-exact against BLAS.

:class:`GemvPass` runs it as inductor's ``post_grad_custom_post_pass``
(:func:`compression.fused.compile_forward_` with ``gemv=True``).
"""

from __future__ import annotations

import torch

from compression.graph_cse import CountingPass

aten = torch.ops.aten
DTYPES = (torch.float32, torch.float64)


def _val(node: object) -> object:
    return node.meta.get("val") if isinstance(node, torch.fx.Node) else node


def _one_static_row(a: object, b: object) -> bool:
    """``a (1 x k)`` and ``b (k x n)``: 2-D CPU tensors of one floating dtype, every size a plain int."""
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return False
    if a.dim() != 2 or b.dim() != 2 or a.device.type != "cpu" or b.device.type != "cpu":
        return False
    if a.dtype not in DTYPES or b.dtype != a.dtype:
        return False
    sizes = (*a.shape, *b.shape)
    return all(type(s) is int for s in sizes) and a.shape[0] == 1


def _add(graph: torch.fx.Graph, target, args: tuple, fake_mode) -> torch.fx.Node:
    """A new node ``target(*args)`` with its fake value (inductor's lowering reads ``meta["val"]``)."""
    node = graph.call_function(target, args)
    with fake_mode:
        node.meta["val"] = target(*(_val(a) for a in args))
    return node


def decompose_gemv(graph: torch.fx.Graph) -> int:
    """Rewrite the one-row CPU ``mm`` / ``addmm`` nodes of ``graph`` in place (module docstring); returns how many."""
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in (aten.mm.default, aten.addmm.default):
            continue
        if node.target is aten.addmm.default:
            if any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")) or len(node.args) != 3:
                continue
            bias, a, b = node.args
        else:
            bias, (a, b) = None, node.args
        a_val, b_val = _val(a), _val(b)
        if not _one_static_row(a_val, b_val):
            continue
        bias_val = _val(bias)
        if bias is not None and (not isinstance(bias_val, torch.Tensor) or bias_val.dtype != a_val.dtype):
            continue
        modes = [getattr(v, "fake_mode", None) for v in (a_val, b_val, bias_val) if v is not None]
        fake_mode = modes[0]
        if fake_mode is None or any(m is not fake_mode for m in modes):  # no one fake mode for the new values
            continue
        with graph.inserting_before(node):
            column = _add(graph, aten.unsqueeze.default, (a, 2), fake_mode)  # 1 x k x 1
            rows = _add(graph, aten.unsqueeze.default, (b, 0), fake_mode)  # 1 x k x n
            out = _add(graph, aten.sum.dim_IntList, (_add(graph, aten.mul.Tensor, (column, rows), fake_mode), [1]),
                       fake_mode)  # 1 x n
            if bias is not None:
                out = _add(graph, aten.add.Tensor, (out, bias), fake_mode)
        node.replace_all_uses_with(out)
        graph.erase_node(node)
        rewritten += 1
    return rewritten


class GemvPass(CountingPass):
    """Inductor post-grad pass running :func:`decompose_gemv`; ``changed`` counts the products it replaced.

    Given as ``torch.compile(..., options={"post_grad_custom_post_pass": GemvPass()})``."""

    def rewrite(self, graph: torch.fx.Graph) -> int:
        return decompose_gemv(graph)
