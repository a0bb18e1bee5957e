"""DBRX (``models/layouts/dbrx.py``): experts stored as flat ``E·I x n`` matrices (``ffn.experts.mlp.w1`` / ``v1`` /
``w2``, the last used as ``h w2``) become per-expert linears (form ``"dbrx"``), the router stays dense, and the fused,
clamped qkv is factorized as one matrix.  The architecture matrix runs every stage on the tiny ``DBRX`` family
(``benchmarks/architecture_families.py``); these tests pin what is particular to it."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.architectures import batches, build, logits, prepared, sequential_vs_all_at_once, targets
from compression.forms import LinearExperts, _linearize_experts, apply_forms_plan, linearize_
from compression.latent_cache import enable_latent_cache_
from models.layouts import layout_of

pytestmark = pytest.mark.usefixtures("one_thread")


def _ids(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))


def test_linearized_experts_compute_what_the_flat_weights_do():
    model = build("DBRX")
    ids = _ids()
    ref = logits(model, ids)
    experts = model.transformer.blocks[0].ffn.experts
    w1, v1, w2 = (getattr(experts.mlp, n).detach().clone() for n in ("w1", "v1", "w2"))
    forms = linearize_(model, layout_of(model))
    assert forms == {"experts": {f"transformer.blocks.{i}.ffn.experts": {
        "gate_up": "gate_up_proj", "down": "down_proj", "act": "act_fn", "form": "dbrx"} for i in range(2)}}
    new = model.transformer.blocks[0].ffn.experts
    assert isinstance(new, LinearExperts) and new.num_experts == 4
    inter = 64
    for e in range(4):  # expert e owns rows e·I .. (e+1)·I of each flat matrix; w2's rows are down's columns
        rows = slice(e * inter, (e + 1) * inter)
        assert torch.equal(new.gate_up_proj[e].weight, torch.cat([w1[rows], v1[rows]]))
        assert torch.equal(new.down_proj[e].weight, w2[rows].T)
    out = logits(model, ids)  # the experts receive [B, S, n] and return that shape
    assert float((out - ref).norm() / ref.norm()) < 1e-13
    fresh = build("DBRX")  # the plan's forms entry replays on a freshly built model
    assert apply_forms_plan(fresh, forms) == list(forms["experts"])
    fresh.load_state_dict(model.state_dict())
    assert torch.equal(logits(fresh, ids), out)


def test_router_is_kept_dense_and_every_expert_matrix_is_a_target():
    model = build("DBRX")
    linearize_(model, layout_of(model))
    layout = layout_of(model)
    assert layout.routers() == [f"transformer.blocks.{i}.ffn.router.layer" for i in range(2)]
    names = targets(model)
    assert not set(layout.routers()) & set(names)
    for i in range(2):
        p = f"transformer.blocks.{i}"
        assert {f"{p}.norm_attn_norm.attn.Wqkv", f"{p}.norm_attn_norm.attn.out_proj"} <= set(names)
        assert {f"{p}.ffn.experts.{m}.{e}" for m in ("gate_up_proj", "down_proj") for e in range(4)} <= set(names)
    attn = layout.blocks[0].attn
    assert attn.fused and [len(r) for r in attn.qkv_rows] == [1, 1, 1]
    assert attn.qkv_rows == (((0, 32),), ((32, 48),), ((48, 64),))  # q: 4 heads of 8, k and v: 2 KV heads each
    assert [b.attn_norm.kind for b in layout.blocks] == ["layer", "layer"]


def test_latent_cache_is_refused_for_the_qkv_clamp_and_bad_experts_are_named():
    model = build("DBRX")
    linearize_(model, layout_of(model))
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotImplementedError, match=r"DbrxForCausalLM \(dbrx layout\): latent_cache .*clip_qkv: 8.0"):
        enable_latent_cache_(model, layout_of(model))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    experts = build("DBRX").transformer.blocks[0].ffn.experts
    experts.mlp.w2 = torch.nn.Parameter(experts.mlp.w2[:-1].detach())  # not E·I rows any more
    with pytest.raises(ValueError, match=r"DbrxExperts: expected DBRX experts .*mlp.w1 / v1 / w2"):
        _linearize_experts(experts, "gate_up_proj", "down_proj", "act_fn", "dbrx")


def test_sequential_calibration_with_dense_propagation_is_the_all_at_once_compression():
    """Block by block (each block's experts calibrated on the tokens the dense model routes to them) with dense
    propagation gives bit-identical logits to collecting every statistic in one pass."""
    model, _, _ = prepared("DBRX")
    sequential, all_at_once = sequential_vs_all_at_once(model, targets(model))
    assert torch.equal(sequential, all_at_once)
    assert not torch.equal(sequential, logits(prepared("DBRX")[0], batches()[0]["input_ids"]))  # it compressed
