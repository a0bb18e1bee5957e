"""Gemma 4 text decoders (``models/layouts/gemma4.py``): per-layer attention shapes, KV-sharing layers with ``q_proj``
alone, ``attention_k_eq_v`` full layers with ``q_proj`` and ``k_proj``, per-layer embeddings, and the MoE block beside
the dense MLP.  The architecture matrix runs every stage on the three tiny variants (``Gemma4``, ``Gemma4-MoE``,
``Gemma4-dense`` in ``benchmarks/architecture_families.py``); these tests pin what is particular to the family."""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.architectures import _joint, batches, logits, prepared, rel, sequential_vs_all_at_once, targets
from compression import LowRankLinear, Recipe, compress_
from compression.joint import JointProjection, find_joint_groups
from compression.rotation import rotate_model_
from lightning_modules.specs import CausalLMSpec
from models.layouts import layout_of

pytestmark = pytest.mark.usefixtures("one_thread")


def test_layout_follows_each_layers_attention():
    model, layout, _ = prepared("Gemma4")
    attn = [b.attn for b in layout.blocks]
    # sliding layer with k and v; full layer with k = v (16-wide heads, 1 KV head); then two KV-sharing layers
    assert [len(a.readers) for a in attn] == [3, 2, 1, 1]
    assert [(a.head_dim, a.kv_heads) for a in attn] == [(8, 2), (16, 1), (8, 2), (16, 1)]
    assert [a.rotary_args for a in attn] == [("sliding_attention",), ("full_attention",)] * 2
    assert [a.sliding_window for a in attn] == [4, None, 4, None]
    assert all(a.q_norm.offset == 0.0 for a in attn)  # Gemma 4 scales by w, not Gemma 3's 1 + w
    assert [a.k_norm is not None for a in attn] == [True, True, False, False]
    assert layout.embedding_scale == pytest.approx(32 ** 0.5)
    assert not layout.supports("latent_cache") and not layout.supports("sequential") and layout.supports("rotation")
    assert find_joint_groups(model, layout) == {
        "model.layers.0.self_attn": [f"model.layers.0.self_attn.{n}_proj" for n in "qkv"],
        "model.layers.1.self_attn": [f"model.layers.1.self_attn.{n}_proj" for n in "qk"]}
    moe_model, moe, _ = prepared("Gemma4-MoE")
    assert moe.routers() == ["model.layers.0.router.proj", "model.layers.1.router.proj"]
    assert not set(moe.routers()) & set(targets(moe_model))  # routers stay dense
    assert not moe.supports("rotation") and moe.supports("sequential")


def test_joint_qkv_factorizes_a_lone_q_proj_as_a_single_layer():
    """KV-sharing layers have q_proj alone: no group (nothing to share a down with), the layer is a plain low-rank
    one; the k_eq_v layer's q/k share one down.  At full rank the logits are unchanged."""
    model, layout, _ = prepared("Gemma4")
    ids = batches()[0]["input_ids"]
    ref = logits(model, ids)
    full = copy.deepcopy(model)
    _joint(full, layout, full=True)
    assert rel(logits(full, ids), ref) < 1e-12
    report = _joint(model, layout, method="svd_llm")
    assert [r.name for r in report.layers] == ["model.layers.0.self_attn.qkv", "model.layers.1.self_attn.qkv",
                                               "model.layers.2.self_attn.q_proj", "model.layers.3.self_attn.q_proj"]
    for i in (0, 1):
        assert isinstance(model.get_submodule(f"model.layers.{i}.self_attn.q_proj"), JointProjection)
    for i in (2, 3):
        assert isinstance(model.get_submodule(f"model.layers.{i}.self_attn.q_proj"), LowRankLinear)
    assert torch.isfinite(logits(model, ids)).all()


def test_sequential_is_refused_with_kv_sharing_and_exact_without():
    model, _, _ = prepared("Gemma4")
    names = [n for n in targets(model) if "per_layer_model_projection" not in n]  # outside the blocks
    before = {k: v.clone() for k, v in model.state_dict().items()}
    recipe = Recipe("svd_llm", ratio=0.3, targets=names, calibration={"mode": "sequential", "propagate": "dense"})
    with pytest.raises(NotImplementedError, match=r"Gemma4ForCausalLM .*sequential is not supported: its last 2 layers "
                                                  r"reuse the keys and values.*all_at_once"):
        compress_(model, recipe, family=CausalLMSpec(model=model), batches=batches())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    # without KV sharing, block by block with dense propagation is exactly the all-at-once compression
    dense, _, _ = prepared("Gemma4-dense")
    sequential, all_at_once = sequential_vs_all_at_once(dense, targets(dense))
    assert torch.equal(sequential, all_at_once)


def test_rotation_turns_the_reader_norms_and_leaves_the_per_layer_embeddings():
    model, layout, _ = prepared("Gemma4")
    ids = batches()[0]["input_ids"]
    ref = logits(model, ids)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rotate_model_(model, layout_of(model), seed=1)
    assert rel(logits(model, ids), ref) <= 1e-6
    after = model.state_dict()
    changed = {k for k in before if k in after and not torch.equal(before[k], after[k])}
    readers = {f"{r}.weight" for b in layout.blocks for r in (*b.attn.readers, *b.mlp.readers)}
    downs = {f"{b.mlp.writer}.weight" for b in layout.blocks}  # their input turns by the MLP's online Hadamard
    # every reader turned; o_proj, the norms, the embeddings and the head as they were
    assert changed == readers | downs
    assert not any("per_layer" in k for k in changed)
    wrapped = {n for n, m in model.named_modules() if type(m).__name__ == "RotatedOutput"}
    assert wrapped == {f"model.layers.{i}.{n}" for i in range(4) for n in ("input_layernorm",
                                                                            "pre_feedforward_layernorm")}
