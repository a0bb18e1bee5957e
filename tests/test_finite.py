"""``all_finite`` agrees with ``torch.isfinite(t).all()`` everywhere, including where its one-pass sum overflows."""

import pytest
import torch

from compression.finite import all_finite


def reference(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_one_non_finite_element_anywhere(dtype, bad):
    t = torch.randn(7, 13, generator=torch.Generator().manual_seed(0)).to(dtype)
    assert all_finite(t)
    for index in [(0, 0), (3, 5), (6, 12)]:
        u = t.clone()
        u[index] = bad
        assert not all_finite(u) and not reference(u)
        assert not all_finite(u.T)  # a strided view


def test_opposite_infinities_sum_to_nan():
    t = torch.tensor([float("inf"), 1.0, float("-inf")], dtype=torch.float64)
    assert torch.isnan(t.sum()) and not all_finite(t)


@pytest.mark.parametrize("dtype, big", [(torch.float64, 1e308), (torch.float32, 3e38), (torch.bfloat16, 3e38),
                                        (torch.float16, 6e4)])
def test_finite_elements_whose_sum_overflows(dtype, big):
    t = torch.full((64,), big, dtype=dtype)
    total = t.sum(dtype=torch.float32) if dtype in (torch.float16, torch.bfloat16) else t.sum()
    if dtype != torch.float16:  # float16 is summed in float32, which holds 64 x 6e4
        assert torch.isinf(total)  # the fast path cannot decide: the elementwise test does
    assert all_finite(t) and reference(t)
    t[10] = float("nan")
    assert not all_finite(t)


def test_integers_bools_and_empty_tensors_are_finite():
    assert all_finite(torch.arange(10)) and all_finite(torch.ones(3, dtype=torch.bool))
    assert all_finite(torch.empty(0, 5))


def test_complex():
    t = torch.randn(4, 4, dtype=torch.complex128)
    assert all_finite(t)
    t[1, 2] = complex(0.0, float("nan"))
    assert not all_finite(t) and not reference(t)
