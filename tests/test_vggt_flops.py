"""FLOP counting (metrics/flops.py): exact small cases, per-component breakdown, 1B on meta."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from metrics.flops import VGGT_COMPONENTS, count_flops, vggt_flops
from models.vggt import VGGT, VGGTConfig


def test_count_flops_exact_for_linear_stack() -> None:
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    x = torch.randn(5, 8)
    flops = count_flops(model, x)
    assert flops["0"] == pytest.approx(2 * 5 * 8 * 16 / 1e9)
    assert flops["2"] == pytest.approx(2 * 5 * 16 * 4 / 1e9)
    assert flops["1"] == 0 and flops["other"] == 0
    assert flops["total"] == pytest.approx(flops["0"] + flops["2"])
    assert all(p.requires_grad for p in model.parameters())  # restored after counting
    with pytest.raises(ValueError, match="no sub-module"):
        count_flops(model, x, prefixes=["5.weight_layer"])


def test_tiny_vggt_breakdown_sums_to_total() -> None:
    model = VGGT(VGGTConfig.tiny())
    flops = vggt_flops(model, num_frames=3, image_hw=(28, 42), num_query_points=4)
    assert set(flops) == {*VGGT_COMPONENTS, "other", "total"}
    assert all(flops[c] > 0 for c in VGGT_COMPONENTS)
    assert sum(flops[c] for c in VGGT_COMPONENTS) + flops["other"] == pytest.approx(flops["total"])
    assert flops["other"] == pytest.approx(0, abs=1e-9)
    # the frame blocks: per block 2·T·C·12C (qkv, proj, fc1, fc2) + 4·T·P·C (attention), T = S·P tokens
    S, P, C, depth = 3, 5 + 6, 64, 4
    expected = depth * (2 * S * P * C * 12 * C + 4 * S * P * P * C)
    assert flops["aggregator.frame_blocks"] == pytest.approx(expected / 1e9)
    expected_global = depth * (2 * S * P * C * 12 * C + 4 * (S * P) ** 2 * C)
    assert flops["aggregator.global_blocks"] == pytest.approx(expected_global / 1e9)
    with torch.device("meta"):
        meta_model = VGGT(VGGTConfig.tiny())
    assert vggt_flops(meta_model, num_frames=3, image_hw=(28, 42), num_query_points=4) == flops


def test_vggt_1b_flops_on_meta_match_reference() -> None:
    one = vggt_flops(num_frames=1)  # default: 1B without track head, on the meta device
    eight = vggt_flops(num_frames=8)
    assert one["total"] / 1e3 == pytest.approx(3.65, rel=0.01)
    assert eight["total"] / 1e3 == pytest.approx(39.6, rel=0.01)
    assert one["track_head"] == 0
    # global attention grows with S^2: the global blocks cost more than the frame blocks at 8 frames
    assert eight["aggregator.global_blocks"] > 2 * eight["aggregator.frame_blocks"]
    assert one["aggregator.global_blocks"] == pytest.approx(one["aggregator.frame_blocks"])
