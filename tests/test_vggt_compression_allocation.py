"""Cost-weighted (FLOPs) rank allocation, checked with hand-computed numbers, and VGGT's token counts.

A layer's FLOPs per forward are ``2 T m n`` dense and ``2 T r (m + n)`` factored (``T`` tokens
through it), so weighting each parameter by ``T`` turns the parameter budget into a FLOPs budget.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from compression import Recipe, StatsCollector, allocate, collect_stats, gradient_allocation
from compression.allocation import cost_of, token_cost_weights, v2_ratios
from lightning_modules import VGGTSpec
from tests.test_vggt_spec import make_batch


def test_v2_cost_weighted_mean_by_hand():
    # two 4x4 layers of one group; -log(loss) weights from their spectra at rank_for_ratio(4, 4, 0.5) = 1
    shapes = {"l0": (4, 4), "l1": (4, 4)}
    spectra = {"l0": torch.tensor([2.0, 1.0, 1.0, 0.0]), "l1": torch.tensor([1.0, 1.0, 1.0, 1.0])}
    w0, w1 = -torch.tensor(2 / 6).log().item(), -torch.tensor(3 / 4).log().item()  # ℓ = 2/6 and 3/4
    plain = v2_ratios(shapes, spectra, 0.5, group_of=lambda n: "g")
    scale = 0.5 * 32 / (16 * (w0 + w1))  # ρ_i = w_i · ρ Σ P / Σ w P
    assert plain == pytest.approx({"l0": w0 * scale, "l1": w1 * scale})
    costs = {"l0": 9.0, "l1": 1.0}  # l0 sees 9x the tokens
    weighted = v2_ratios(shapes, spectra, 0.5, group_of=lambda n: "g", cost_weights=costs)
    scale = 0.5 * (9 * 16 + 16) / (9 * 16 * w0 + 16 * w1)
    assert weighted == pytest.approx({"l0": w0 * scale, "l1": w1 * scale})
    removed = sum(weighted[n] * costs[n] * 16 for n in shapes) / sum(costs[n] * 16 for n in shapes)
    assert removed == pytest.approx(0.5)  # the FLOPs-weighted mean is the target
    assert v2_ratios(shapes, spectra, 0.5, group_of=lambda n: "g", cost_weights={"l0": 4.0, "l1": 4.0}) == (
        pytest.approx(plain))  # equal weights change nothing


class TwoBlocks(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(12, 12)) for _ in range(2)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def _token_stats(model: nn.Module, tokens: dict[str, int]):
    """Statistics whose token counts say block 0 sees 9x the tokens of block 1 (a FLOPs budget reads counts)."""
    stats = collect_stats(model, list(tokens), [torch.randn(2, 12)])
    for name, count in tokens.items():
        stats[name].count = count
    return stats


def test_flops_budget_uniform_and_v2():
    model = TwoBlocks()
    with torch.no_grad():  # give block 1 a flat spectrum (orthogonal) so v2 separates the two layers
        model.blocks[1][0].weight.copy_(torch.linalg.qr(torch.randn(12, 12))[0])
    shapes = {f"blocks.{i}.0": (12, 12) for i in range(2)}
    stats = _token_stats(model, {"blocks.0.0": 9, "blocks.1.0": 1})
    uniform = allocate(model, Recipe("svd", ratio=0.5, budget="flops"), stats)
    assert uniform.ranks == {n: 3 for n in shapes}  # floor(0.5 * 144 / 24) = 3, weights or not
    costs = {"blocks.0.0": 9.0, "blocks.1.0": 1.0}
    assert 1 - cost_of(shapes, uniform.ranks, costs) / cost_of(shapes, None, costs) == pytest.approx(0.5)
    plain = allocate(model, Recipe("svd", ratio=0.5, allocation="v2"))
    flops = allocate(model, Recipe("svd", ratio=0.5, allocation="v2", budget="flops"), stats)
    p_ratio = sum(plain.ratios[n] for n in shapes) / 2
    f_ratio = (9 * flops.ratios["blocks.0.0"] + flops.ratios["blocks.1.0"]) / 10
    assert p_ratio == pytest.approx(0.5) and f_ratio == pytest.approx(0.5)
    # v2 cuts the peaked (random) layer harder than the flat (orthogonal) one; weighting the peaked
    # layer 9x pulls its ratio towards the target, and the flat one pays for it
    assert plain.ratios["blocks.0.0"] > flops.ratios["blocks.0.0"] > 0.5 > plain.ratios["blocks.1.0"]
    assert flops.ratios["blocks.1.0"] < plain.ratios["blocks.1.0"]
    with pytest.raises(ValueError, match="needs calibration statistics"):
        allocate(model, Recipe("svd", ratio=0.5, budget="flops"))


def test_gradient_allocation_flops_budget_by_hand():
    importance = {"A": torch.tensor([10.0, 9, 8, 7]), "B": torch.tensor([5.0, 4, 3, 2])}
    shapes = {"A": (4, 4), "B": (4, 4)}
    # parameters: budget 0.75 * 32 = 24; each matrix keeps 1 (16 used); A's next (9/8) beats B's (4/8)
    by_params = gradient_allocation(importance, shapes, ratio=0.25)
    assert by_params.ranks == {"A": 2, "B": 1} and by_params.used == 24 and by_params.budget == 24
    # FLOPs: B sees 1/100 of A's tokens, so its components cost 0.08 against 8: all of B fits
    by_flops = gradient_allocation(importance, shapes, ratio=0.25, weights={"A": 1.0, "B": 0.01})
    assert by_flops.budget == pytest.approx(0.75 * 16.16)
    assert by_flops.ranks == {"A": 1, "B": 4} and by_flops.used == pytest.approx(8 + 4 * 0.08)
    assert cost_of(shapes, by_flops.ranks, {"A": 1.0, "B": 0.01}) == pytest.approx(by_flops.used * 1.0)
    with pytest.raises(ValueError, match="every matrix"):
        gradient_allocation(importance, shapes, ratio=0.25, weights={"A": 1.0})


def test_vggt_token_counts_are_flops_weights():
    """Hooked calibration forward: each layer's token count reproduces its FLOPs share exactly."""
    from metrics.flops import count_flops

    spec = VGGTSpec()
    model = spec.build().eval()
    names = spec.default_targets(model)
    batch = make_batch(num_scenes=1, num_views=3, hw=(28, 42))
    with torch.no_grad(), StatsCollector(model, names, with_gram=False) as collector:
        spec.calibration_forward(model, batch)
    weights = token_cost_weights(collector.stats, names)
    S, P = 3, 5 + 2 * 3
    assert weights["aggregator.frame_blocks.0.attn.qkv"] == S * P
    assert weights["aggregator.patch_embed.blocks.0.mlp.fc1"] == S * (1 + 4 + 6)  # cls + registers + patches
    cfg = model.config
    assert weights["camera_head.trunk.0.attn.qkv"] == S * cfg.camera_iters  # one camera token per frame
    for name in ("aggregator.global_blocks.1.mlp.fc2", "camera_head.trunk.0.mlp.fc1"):
        layer = model.get_submodule(name)
        flops = count_flops(model, spec.images(batch), prefixes=[name])[name] * 1e9
        assert flops == pytest.approx(2 * weights[name] * layer.in_features * layer.out_features)
