"""Latent KV cache: same greedy tokens as the plain cache, latents (not K/V) stored, bytes per token."""

from __future__ import annotations

import copy

import pytest
import torch

from compression import collect_stats, eligible_linears
from compression.latent_cache import (
    LatentAttention,
    LatentCacheLayer,
    disable_latent_cache_,
    enable_latent_cache_,
    kv_bytes_per_token,
)
from compression.latent_cache_layers import GrowingLayer, PlainKeyLayer
from models.causal_lm import cache_keyword, output_cache
from models.layouts import layout_of
from tests.conftest import compress_joint, make_tiny_llama


@pytest.fixture
def joint_pair(token_batches):
    model = make_tiny_llama().double()
    stats = collect_stats(model, list(eligible_linears(model)[0]), token_batches)
    compress_joint(model, "svd_llm_v2", stats, ratio=0.3)
    latent = copy.deepcopy(model)
    assert enable_latent_cache_(latent, layout_of(latent)) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    return model, latent


def _generate(model, prompt, mask=None):
    out = model.generate(prompt, attention_mask=mask, max_new_tokens=16, do_sample=False, output_scores=True,
                         return_dict_in_generate=True, pad_token_id=0)
    return out.sequences, torch.stack(out.scores)


def _cache_of(out):
    return output_cache(out)


@pytest.mark.parametrize("keys", ["latent", "plain"])
def test_greedy_generation_matches_plain_cache(joint_pair, keys):
    plain, latent = joint_pair
    if keys == "plain":
        latent = copy.deepcopy(plain)
        enable_latent_cache_(latent, layout_of(latent), keys="plain")
    prompt = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    seq_a, scores_a = _generate(plain, prompt)
    seq_b, scores_b = _generate(latent, prompt)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-9)
    mask = torch.ones_like(prompt)
    mask[1, :4] = 0  # left padding: positions come from the mask, RoPE must use the cached ones
    seq_a, scores_a = _generate(plain, prompt, mask)
    seq_b, scores_b = _generate(latent, prompt, mask)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-9)


def test_cache_holds_latents_and_positions(joint_pair):
    plain, latent = joint_pair
    prompt = torch.randint(0, 128, (2, 6))
    with torch.no_grad():
        out = latent(prompt, use_cache=True)
        ref = plain(prompt).logits
        step = latent(torch.tensor([[5], [7]]), **{cache_keyword(latent): _cache_of(out)}, use_cache=True)
        full = plain(torch.cat([prompt, torch.tensor([[5], [7]])], 1)).logits[:, -1:]
    torch.testing.assert_close(out.logits, ref, rtol=0, atol=1e-10)
    torch.testing.assert_close(step.logits, full, rtol=0, atol=1e-10)
    layer = _cache_of(step).layers[0]
    rank = latent.model.layers[0].self_attn.qkv_latent.rank
    assert isinstance(layer, LatentCacheLayer) and rank == 29
    assert all(not b.self_attn.qkv_latent.memo.held for b in latent.model.layers)  # no latent held past the call
    assert tuple(layer.keys.shape) == (2, 1, 7, rank)  # the latent, not [2, kv_heads, 7, head_dim]
    assert layer.values.tolist() == [[[[i] for i in range(7)]]] * 2
    assert _cache_of(step).get_seq_length() == 7
    assert layer.nbytes_per_token() == 2 * (rank * 8 + 8)  # float64 latent + int64 position, 2 rows


def test_bytes_per_token_and_state_dict_unchanged(joint_pair):
    plain, latent = joint_pair
    sizes = kv_bytes_per_token(latent, layout_of(latent), latent=True, bytes_per_value=2)
    assert sizes["dense_values"] == 2 * (2 * 2 * 16) and sizes["latent_values"] == 2 * 29
    assert sizes["latent_bytes"] == 116 and sizes["dense_bytes"] == 256
    assert list(latent.state_dict()) == list(plain.state_dict())
    assert disable_latent_cache_(latent) == ["model.layers.0.self_attn", "model.layers.1.self_attn"]
    assert not any(isinstance(m, LatentAttention) for m in latent.modules())
    x = torch.randint(0, 128, (1, 5))
    with torch.no_grad():
        assert torch.equal(latent(x).logits, plain(x).logits)


def test_a_layer_without_positions_is_refused_before_any_layer_is_swapped(joint_pair):
    """A joint attention whose spec has no rotary module and is not NoPE has no K rebuild: refused, and the
    earlier layers, which could have been swapped, are left as they were (checked before any swap)."""
    import dataclasses

    plain, _ = joint_pair
    model = copy.deepcopy(plain)
    layout = layout_of(model)
    last = layout.blocks[-1]
    blocks = (*layout.blocks[:-1], dataclasses.replace(last, attn=dataclasses.replace(last.attn, rotary=None)))
    with pytest.raises(NotImplementedError, match="model.layers.1.self_attn has no rotary module"):
        enable_latent_cache_(model, dataclasses.replace(layout, blocks=blocks))
    assert not any(isinstance(m, LatentAttention) for m in model.modules())
    with pytest.raises(ValueError, match="NoPE layer has no rotary module"):
        dataclasses.replace(last.attn, nope=True)


def test_an_attention_parameter_the_rebuild_does_not_use_is_refused(joint_pair):
    """A parameter of the attention module itself (a learned scale, Flint-style sinks under another name...) that the
    rebuilt attention would not apply: refused, naming it, before any layer is swapped; ``sinks`` is used (GPT-OSS)."""
    plain, _ = joint_pair
    model = copy.deepcopy(plain)
    model.model.layers[1].self_attn.head_scale = torch.nn.Parameter(torch.ones(4, dtype=torch.float64))
    with pytest.raises(NotImplementedError, match=r"model.layers.1.self_attn also has \['head_scale'\] \(Parameter\)"):
        enable_latent_cache_(model, layout_of(model))
    assert not any(isinstance(m, LatentAttention) for m in model.modules())


def test_requires_joint_layers():
    with pytest.raises(ValueError, match="joint_qkv: true"):
        enable_latent_cache_(make_tiny_llama(), layout_of(make_tiny_llama()))


def test_decoding_folds_the_values_instead_of_rebuilding_them(joint_pair, monkeypatch):
    """One-token steps take the value-absorbed path (eval mode is inherited from the replaced attention);
    its logits equal the path that rebuilds ``U_v Z`` to float64 precision."""
    from compression.latent_cache import LatentAttention

    _, latent = joint_pair
    assert not any(m.training for m in latent.modules() if isinstance(m, LatentAttention))
    calls = []
    real = LatentAttention._absorbed
    monkeypatch.setattr(LatentAttention, "_absorbed", lambda self, *a: calls.append(1) or real(self, *a))
    prompt = torch.randint(0, 128, (2, 7), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(prompt)
    mask[0, :3] = 0
    seq_a, scores_a = _generate(latent, prompt, mask)
    assert len(calls) == 2 * 15  # 2 layers x 15 one-token steps (the prompt is one rebuilt step)
    monkeypatch.setattr(LatentAttention, "_absorbs", lambda self, q_len: False)
    seq_b, scores_b = _generate(latent, prompt, mask)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-12)


def test_plain_keys_cache_holds_the_plain_keys_and_latents(joint_pair):
    """``keys="plain"``: the cached keys are the plain cache's rotated keys; the values are the latents."""
    plain, _ = joint_pair
    latent = copy.deepcopy(plain)
    enable_latent_cache_(latent, layout_of(latent), keys="plain")
    prompt = torch.randint(0, 128, (2, 6), generator=torch.Generator().manual_seed(3))
    nxt = torch.tensor([[5], [7]])
    with torch.no_grad():
        ref = plain(prompt, use_cache=True)
        ref_step = plain(nxt, **{cache_keyword(plain): _cache_of(ref)}, use_cache=True)
        out = latent(prompt, use_cache=True)
        step = latent(nxt, **{cache_keyword(latent): _cache_of(out)}, use_cache=True)
    torch.testing.assert_close(step.logits, ref_step.logits, rtol=0, atol=1e-10)
    layer, ref_layer = _cache_of(step).layers[0], _cache_of(ref_step).layers[0]
    assert isinstance(layer, PlainKeyLayer)
    torch.testing.assert_close(layer.keys, ref_layer.keys, rtol=0, atol=1e-12)
    assert tuple(layer.values.shape) == (2, 1, 7, 29)  # latents, not [2, 2, 7, 16] values
    assert layer.nbytes_per_token() == 2 * (2 * 16 + 29) * 8  # float64 keys (2 kv heads x 16) + latent, 2 rows
    sizes = kv_bytes_per_token(latent, layout_of(latent), latent=True, keys="plain")
    assert sizes["latent_values"] == 2 * (2 * 16 + 29) and sizes["dense_values"] == 2 * 64
    with pytest.raises(ValueError, match="keys='rope'"):
        enable_latent_cache_(copy.deepcopy(plain), layout_of(plain), keys="rope")


def test_cache_filled_in_one_key_mode_is_refused_by_the_other(joint_pair):
    plain, latent = joint_pair
    other = copy.deepcopy(plain)
    enable_latent_cache_(other, layout_of(other), keys="plain")
    prompt = torch.randint(0, 128, (1, 4))
    with torch.no_grad():
        cache = _cache_of(latent(prompt, use_cache=True))
        with pytest.raises(TypeError, match="keys='plain'"):
            other(prompt[:, :1], **{cache_keyword(other): cache}, use_cache=True)


def test_growing_layer_appends_in_place_and_survives_crop_and_copy():
    """The buffer behind the cache is written only where new tokens go: the tensor equals ``torch.cat`` of the
    steps, its storage does not move between steps within the capacity, and a crop or a deepcopy stays exact."""
    g = torch.Generator().manual_seed(0)
    steps = [torch.randn(2, 3, t, 4, generator=g) for t in (5, 1, 1, 2, 1)]
    layer = GrowingLayer()
    ptrs = []
    for s in steps:
        keys, values = layer.update(s, -s)
        ptrs.append(keys.data_ptr())
    assert torch.equal(keys, torch.cat(steps, dim=-2)) and torch.equal(values, -keys)
    assert len(set(ptrs)) == 1  # 10 tokens fit the first buffer (5 + 64 spare)
    twin = copy.deepcopy(layer)
    layer.crop(-3)
    extra = torch.randn(2, 3, 2, 4, generator=g)
    keys, _ = layer.update(extra, -extra)
    assert torch.equal(keys, torch.cat([*steps, extra], dim=-2)[..., [*range(7), 10, 11], :])
    assert torch.equal(twin.keys, torch.cat(steps, dim=-2))  # the copy did not see the overwrite
    big = torch.randn(2, 3, 80, 4, generator=g)
    keys, _ = twin.update(big, big)  # past the capacity: a larger buffer, same contents
    assert torch.equal(keys, torch.cat([*steps, big], dim=-2))


@pytest.mark.parametrize("keys", ["latent", "plain"])
def test_beam_search_matches_plain_cache(joint_pair, keys):
    """Beam search reorders the cache rows between steps (a fresh buffer from the reordered tensors)."""
    plain, _ = joint_pair
    latent = copy.deepcopy(plain)
    enable_latent_cache_(latent, layout_of(latent), keys=keys)
    prompt = torch.randint(0, 128, (2, 9), generator=torch.Generator().manual_seed(4))
    kw = dict(max_new_tokens=10, do_sample=False, num_beams=3, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    a, b = plain.generate(prompt, **kw), latent.generate(prompt, **kw)
    assert torch.equal(a.sequences, b.sequences)
    torch.testing.assert_close(torch.stack(b.scores), torch.stack(a.scores), rtol=0, atol=1e-9)


def test_auto_keys_only_where_the_latent_is_narrower_than_the_keys(token_batches, caplog):
    """``keys="auto"``: plain keys + latent values on a layer whose rank is below ``kv_heads * head_dim`` (32 here),
    the plain attention on a wider one; generation still equals the plain cache and the byte count follows."""
    dense = make_tiny_llama().double()
    stats = collect_stats(dense, list(eligible_linears(dense)[0]), token_batches)
    narrow, wide = copy.deepcopy(dense), copy.deepcopy(dense)
    compress_joint(narrow, "svd_llm_v2", stats, ratio=0.3)
    compress_joint(wide, "svd_llm_v2", stats, ratio=0.05)
    ranks = [narrow.model.layers[0].self_attn.qkv_latent.rank, wide.model.layers[1].self_attn.qkv_latent.rank]
    assert ranks[0] < 32 <= ranks[1], ranks
    mixed = copy.deepcopy(narrow)
    mixed.model.layers[1].self_attn = copy.deepcopy(wide.model.layers[1].self_attn)
    plain, auto = mixed, copy.deepcopy(mixed)
    assert enable_latent_cache_(auto, layout_of(auto), keys="auto") == ["model.layers.0.self_attn"]
    assert isinstance(auto.model.layers[0].self_attn, LatentAttention)
    assert auto.model.layers[0].self_attn.key_mode == "plain"
    assert not isinstance(auto.model.layers[1].self_attn, LatentAttention)
    sizes = kv_bytes_per_token(auto, layout_of(auto), latent=True, keys="auto")
    assert sizes["latent_values"] == (32 + ranks[0]) + 64 and sizes["dense_values"] == 128
    prompt = torch.randint(0, 128, (3, 9), generator=torch.Generator().manual_seed(4))
    seq_a, scores_a = _generate(plain, prompt)
    seq_b, scores_b = _generate(auto, prompt)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-9)
    # every latent at least as wide as the keys: nothing swapped, said in a warning, not an error
    with caplog.at_level("WARNING", logger="compression.latent_cache"):
        assert enable_latent_cache_(wide, layout_of(wide), keys="auto") == []
    assert "keep it" in caplog.text
    assert kv_bytes_per_token(wide, layout_of(wide), latent=True, keys="auto")["ratio"] == 1.0
    with pytest.raises(ValueError, match="choose one of"):
        enable_latent_cache_(copy.deepcopy(narrow), layout_of(narrow), keys="fast")


def test_rope_gives_the_floats_of_transformers_apply_rotary_pos_emb():
    """``_rope`` (in place on split views, no ``rotate_half``) equals ``apply_rotary_pos_emb`` bit for bit, on
    a transposed view as the attention passes it and on query + key heads rotated together; partial rotary
    rotates the leading channels only."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    from compression.latent_cache import _rope

    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 5, 4, 16, generator=g).transpose(1, 2)  # [B, H, T, d] view of [B, T, H, d]
    k = torch.randn(2, 5, 2, 16, generator=g).transpose(1, 2)
    angle = torch.randn(2, 5, 8, generator=g)
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    assert torch.equal(_rope(q, cos, sin), ref_q) and torch.equal(_rope(k, cos, sin), ref_k)
    both = _rope(torch.cat([q, k], dim=1), cos, sin)
    assert torch.equal(both[:, :4], ref_q) and torch.equal(both[:, 4:], ref_k)
    part_q, _ = apply_rotary_pos_emb(q[..., :8], k[..., :8], cos[..., 4:12], sin[..., 4:12])
    partial = _rope(q, cos[..., 4:12], sin[..., 4:12])
    assert torch.equal(partial[..., :8], part_q) and torch.equal(partial[..., 8:], q[..., 8:])
    # recorded by autograd (training): built out of place, the same floats, and it differentiates
    qg = q.detach().clone().requires_grad_()
    out = _rope(qg, cos, sin)
    assert torch.equal(out.detach(), ref_q)
    out.sum().backward()
    ref_grad = torch.autograd.grad(apply_rotary_pos_emb(qg, k, cos, sin)[0].sum(), qg)[0]
    assert torch.equal(qg.grad, ref_grad)
    partial = _rope(qg, cos[..., 4:12], sin[..., 4:12])
    assert torch.equal(partial.detach()[..., :8], part_q) and torch.equal(partial.detach()[..., 8:], q[..., 8:])


@pytest.mark.parametrize("keys", ["latent", "plain"])
def test_one_row_decoding_matches_plain_cache(joint_pair, keys):
    """Batch 1 (the deployment case) takes the value fold's single batched GEMM over kv heads; same tokens and
    scores as the plain cache."""
    plain, _ = joint_pair
    latent = copy.deepcopy(plain)
    enable_latent_cache_(latent, layout_of(latent), keys=keys)
    prompt = torch.randint(0, 128, (1, 7), generator=torch.Generator().manual_seed(5))
    seq_a, scores_a = _generate(plain, prompt)
    seq_b, scores_b = _generate(latent, prompt)
    assert torch.equal(seq_a, seq_b)
    torch.testing.assert_close(scores_a, scores_b, rtol=0, atol=1e-9)


def _set_dropouts_(model, family: str) -> str:
    """Switch on the dropouts each family applies inside its attention module; returns the attribute to check."""
    for module in model.modules():
        if family in ("StarCoder2", "Seed-OSS") and hasattr(module, "residual_dropout"):
            module.residual_dropout = 0.5                 # a float
        if family == "GPT-2" and hasattr(module, "resid_dropout") and hasattr(module, "attn_dropout"):
            module.attn_dropout.p, module.resid_dropout.p = 0.3, 0.5   # nn.Dropout modules
        if family == "Falcon" and hasattr(module, "query_key_value"):
            module.attention_dropout = 0.5                # a float on the attention weights
        if family == "OPT" and hasattr(module, "q_proj"):
            module.dropout = 0.5                          # a float named ``dropout``
    return {"GPT-2": "resid_dropout", "Falcon": "attention_dropout", "OPT": "dropout"}.get(family, "residual_dropout")


@pytest.mark.parametrize("family", ["StarCoder2", "Seed-OSS", "GPT-2", "Falcon", "OPT"])
def test_training_mode_applies_the_attentions_own_output_dropout(family):
    """StarCoder2 and Seed-OSS drop out their attention's output (``residual_dropout``, a float) inside the attention
    module, GPT-2 its weights and its output (``attn_dropout`` / ``resid_dropout`` modules), Falcon its weights
    (``attention_dropout``, a float), OPT its weights (``dropout``, a float): in training mode the latent attention
    does the same, drawing the same random numbers in the same order, so one seeded forward gives the same loss as
    the plain model's (and a different one without it)."""
    from benchmarks.architectures import _joint, batches, prepared

    model, layout, _ = prepared(family)
    _joint(model, layout, method="svd_llm_v2")
    name = _set_dropouts_(model, family)
    latent = copy.deepcopy(model)
    enable_latent_cache_(latent, layout_of(latent))
    ids = batches()[0]["input_ids"]

    def loss(m, seed):
        m.train()
        torch.manual_seed(seed)
        out = m(input_ids=ids, labels=ids, use_cache=False)
        return float(out.loss.detach())

    assert loss(latent, 3) == pytest.approx(loss(model, 3), rel=1e-12)
    assert loss(latent, 3) != pytest.approx(loss(latent, 4), rel=1e-6)  # the dropout is on: the seed matters
    attn = latent.get_submodule(layout.blocks[0].attn.path)
    value = getattr(attn, name)
    assert isinstance(attn, LatentAttention) and (value.p if isinstance(value, torch.nn.Dropout) else value) == 0.5
