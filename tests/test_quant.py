"""Fake quantization: error falls with bits, clipping and GPTQ help, whole-model quantization and plans."""

from __future__ import annotations

import pytest
import torch

from compression import (
    ActQuantConfig,
    CompressionConfig,
    JointQKVConfig,
    QuantLinear,
    WeightQuantConfig,
    apply_plan,
    compress_,
    compress_joint_,
    merge_plans,
    quantize_model_,
)
from compression.quant import quantize_activation, quantize_weight_gptq, quantize_weight_rtn
from models.layouts import layout_of
from tests.conftest import make_tiny_llama


def weight_and_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(48, 64, generator=g)
    w[:, 3] *= 8.0  # an outlier input channel
    mix = torch.randn(64, 64, generator=g) / 8 + torch.eye(64)
    x = torch.randn(512, 64, generator=g) @ mix * torch.linspace(0.2, 2.0, 64)
    return w, x


def rel(a, b):
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("cfg", [
    {}, {"symmetric": False}, {"group_size": 16}, {"clip": False}, {"method": "gptq"},
])
def test_weight_error_falls_with_bits(cfg):
    w, x = weight_and_inputs()
    gram = x.double().T @ x.double()
    errs = []
    for bits in (2, 3, 4, 8):
        c = WeightQuantConfig(bits=bits, **cfg)
        wq = quantize_weight_gptq(w, gram, c) if c.method == "gptq" else quantize_weight_rtn(w, c)
        errs.append(rel(x @ wq.T, x @ w.T))
    assert all(b < a for a, b in zip(errs, errs[1:])), errs
    assert errs[-1] < 0.03 and errs[0] > 0.1


def test_symmetric_grid_values_and_levels():
    w, _ = weight_and_inputs()
    wq = quantize_weight_rtn(w, WeightQuantConfig(bits=3, clip=False))
    for row, qrow in zip(w, wq):
        scale = float(row.abs().max()) / 3
        levels = torch.round(qrow / scale)
        torch.testing.assert_close(levels * scale, qrow)
        assert levels.min() >= -4 and levels.max() <= 3 and len(levels.unique()) <= 8


def test_clip_search_lowers_the_searched_norm():
    w, _ = weight_and_inputs()
    for bits in (2, 3, 4):
        plain = quantize_weight_rtn(w, WeightQuantConfig(bits=bits, clip=False))
        clipped = quantize_weight_rtn(w, WeightQuantConfig(bits=bits, clip=True))
        e = lambda q: (q - w).abs().pow(2.4).sum(1)  # noqa: E731
        assert (e(clipped) <= e(plain) + 1e-6).all()
        assert float(e(clipped).sum()) < 0.95 * float(e(plain).sum())


def test_gptq_beats_rtn_on_output_error():
    w, _ = weight_and_inputs()
    g = torch.Generator().manual_seed(5)  # strongly correlated inputs: GPTQ's error feedback has room to work
    x = torch.randn(512, 16, generator=g) @ torch.randn(16, 64, generator=g) + 0.1 * torch.randn(512, 64, generator=g)
    gram = x.double().T @ x.double()
    for bits in (3, 4):
        rtn = rel(x @ quantize_weight_rtn(w, WeightQuantConfig(bits=bits)).T, x @ w.T)
        gptq = rel(x @ quantize_weight_gptq(w, gram, WeightQuantConfig(bits=bits, method="gptq")).T, x @ w.T)
        assert gptq < 0.9 * rtn, (bits, gptq, rtn)


def test_activation_error_falls_with_bits_and_passes_gradients():
    _, x = weight_and_inputs()
    errs = [rel(quantize_activation(x, ActQuantConfig(bits=b)), x) for b in (2, 3, 4, 8)]
    assert all(b < a for a, b in zip(errs, errs[1:])) and errs[-1] < 0.01
    # per token: each row's max magnitude survives exactly (clip ratio 1)
    q = quantize_activation(x, ActQuantConfig(bits=4))
    torch.testing.assert_close(q.abs().amax(1), x.abs().amax(1))
    clipped = quantize_activation(x, ActQuantConfig(bits=4, clip_ratio=0.9))
    assert (clipped.amax(1) <= 0.9 * x.abs().amax(1) + 1e-6).all()  # positive side capped at qmax · scale
    xr = x.clone().requires_grad_(True)
    quantize_activation(xr, ActQuantConfig(bits=4)).sum().backward()
    assert torch.equal(xr.grad, torch.ones_like(x))  # straight-through


def test_quantize_model_covers_dense_lowrank_and_joint_and_plan_rebuilds(token_batches):
    model = make_tiny_llama(tie=False)
    p1 = compress_joint_(model, JointQKVConfig("svd", ratio=0.3), layout=layout_of(model)).plan
    p2 = compress_(model, CompressionConfig("svd", ratio=0.3, targets=["mlp.down_proj"])).plan
    x = token_batches[0]["input_ids"]
    with torch.no_grad():
        ref = model(x).logits
    entry = quantize_model_(model, WeightQuantConfig(bits=8), ActQuantConfig(bits=8))
    names = entry["layers"]
    assert "lm_head" not in names
    assert "model.layers.0.self_attn.qkv_latent.down" in names and "model.layers.0.self_attn.q_proj.up" in names
    assert "model.layers.1.mlp.down_proj.down" in names and "model.layers.1.mlp.down_proj.up" in names
    assert "model.layers.0.mlp.gate_proj" in names and len(names) == 2 * (4 + 3 + 2)
    assert all(isinstance(model.get_submodule(n), QuantLinear) for n in names)
    with torch.no_grad():
        out = model(x).logits
    assert 0 < rel(out, ref) < 0.05  # W8A8 stays close
    plan = merge_plans(p1, p2, {**p2, "layers": {}, "quantization": entry})
    fresh = make_tiny_llama(seed=3, tie=False)
    changed = apply_plan(fresh, plan)
    assert len(changed) == 2 + 2 + len(names)
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(x).logits, out)
    assert apply_plan(fresh, plan) == []


def test_bad_configs_raise():
    with pytest.raises(ValueError, match="bits"):
        WeightQuantConfig(bits=1)
    with pytest.raises(ValueError, match="rtn"):
        WeightQuantConfig(method="awq")
    with pytest.raises(ValueError, match="clip_ratio"):
        ActQuantConfig(clip_ratio=1.5)
    with pytest.raises(ValueError, match="group_size"):
        quantize_weight_rtn(torch.randn(4, 10), WeightQuantConfig(group_size=4))
    with pytest.raises(ValueError, match="Gram"):
        QuantLinear.from_linear(torch.nn.Linear(4, 4), WeightQuantConfig(method="gptq"), None)
