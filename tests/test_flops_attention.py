"""metrics.flops counts every attention kernel scaled_dot_product_attention dispatches to, with grouped-query
shapes too (the CUDA kernels take fewer key / value heads than query heads, where the formula of torch 2.11,
the GPU machine's, asserts).
The CUDA ops are run on meta tensors: their meta kernels give the shapes the counter reads."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from metrics.flops import ATTENTION_OPS, _attention_flops, _extra_formulas

# batch 2, 8 query heads, 2 key / value heads, 16 queries, 24 keys, width 64
Q, KV = (2, 8, 16, 64), (2, 2, 24, 64)
WANT = 2 * 8 * 4 * 16 * 24 * 64  # 4 N M d per query head, every query head counted


def _run(name: str) -> None:
    q = torch.empty(Q, device="meta", dtype=torch.bfloat16)
    k, v = (torch.empty(KV, device="meta", dtype=torch.bfloat16) for _ in range(2))
    op = getattr(torch.ops.aten, name)
    if name in ("_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention"):
        op(q, k, v, None, False)  # attn_bias, compute_log_sumexp
    else:
        op(q, k, v)


@pytest.mark.parametrize("name", [n for n in ATTENTION_OPS if n != "_scaled_dot_product_flash_attention_for_cpu"])
def test_cuda_attention_kernels_count_grouped_query_flops(name):
    with FlopCounterMode(display=False, custom_mapping=_extra_formulas()) as counter:
        _run(name)
    assert counter.get_total_flops() == WANT  # torch 2.11's own formula asserts on these shapes


def test_formula_matches_torch_with_equal_heads_and_refuses_mismatches():
    from torch.utils.flop_counter import sdpa_flop_count

    assert _attention_flops((2, 4, 16, 64), (2, 4, 24, 64), (2, 4, 24, 64)) == sdpa_flop_count(
        (2, 4, 16, 64), (2, 4, 24, 64), (2, 4, 24, 64))
    assert _attention_flops((1, 2, 3, 8), (1, 2, 5, 8), (1, 2, 5, 16)) == 2 * 2 * 3 * 5 * (8 + 16)  # d_v != d
    for key in ((2, 3, 24, 64), (2, 2, 24, 32), (1, 2, 24, 64)):  # 3 does not divide 8; other width; batch
        with pytest.raises(ValueError, match="incompatible"):
            _attention_flops(Q, key, key)
