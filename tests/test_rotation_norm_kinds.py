"""Rotation of LayerNorm, parallel-block and post-norm-only decoders: where it happens, that it is exact, and that it
does what QuaRot rotates for (spreading an outlier channel before per-token 4-bit activation quantization).

A LayerNorm subtracts the mean before scaling, which a rotation of the stream does not commute with, so these
families are rotated at the *readers* (``norm(x) ↦ norm(x) Q`` online, readers ``W ← W Q``; the stream, the norms'
weights and biases, the writers and the head are untouched).  Blocks with no reader norms (OLMo 2) read the stream
raw, so there the stream itself is rotated.  The construction: one channel ``K`` of what the readers read is made
100x the rest; without rotation a per-token A4 quantizer's step is set by that channel and the others round to 0.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from benchmarks.architectures import FAMILIES, build
from compression import ActQuantConfig
from compression.forms import linearize_
from compression.quant import quantize_model_
from compression.rotation import (
    HadamardAfterAct,
    RotatedOutput,
    _install_hadamard_act,
    _install_hadamard_mlp,
    default_site,
    install_online_hadamard_,
    rotate_model_,
)
from models.layouts import layout_of

K, GAIN = 3, 100.0


@pytest.mark.parametrize(("family", "site"), [
    ("LLaMA", "stream"), ("OLMo2", "stream"), ("Gemma3", "readers"), ("StarCoder2", "readers"),
    ("Cohere", "readers"), ("Falcon", "readers"), ("GPT-NeoX", "readers"), ("GPT-2", "readers"),
    ("Phi-3.5-MoE", "readers"), ("OPT", "readers")])
def test_default_site_by_norm_kind(family, site):
    assert default_site(layout_of(build(family))) == site


def _state(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_stream_site_refuses_layernorm_and_parallel_blocks_up_front():
    for family, words in (("StarCoder2", "LayerNorm"), ("Cohere", "LayerNorm")):
        model = build(family)
        before = _state(model)
        with pytest.raises(NotImplementedError, match=rf"{type(model).__name__}: .*{words}.*site='readers'"):
            rotate_model_(model, layout_of(model), site="stream")
        assert _same(before, _state(model))
    model = build("OLMo2")
    with pytest.raises(NotImplementedError, match=r"Olmo2ForCausalLM: .*model\.layers\.0 has none.*site='stream'"):
        rotate_model_(model, layout_of(model), site="readers")


def test_a_conv1d_reader_is_refused_before_anything_changes():
    """GPT-2's Conv1D stores ``W`` as in x out: ``W Q`` would rotate its output, so it must be linearized first."""
    model = build("GPT-2")
    before = _state(model)
    with pytest.raises(TypeError, match="Conv1D.*linearize_"):
        rotate_model_(model, layout_of(model))
    assert _same(before, _state(model))
    assert not any(isinstance(m, RotatedOutput) for m in model.modules())


def _wide(family: str, n: int = 256):
    """The matrix's tiny model of ``family`` at width ``n`` (a Hadamard spreads an outlier over ``n`` channels,
    so 32 is too narrow to show it), every weight in ``nn.Linear`` form."""
    import transformers

    config_cls, model_cls, kwargs = FAMILIES[family]
    wide = {"GPT-2": {"n_embd": n}, "OPT": {"hidden_size": n, "ffn_dim": 2 * n, "word_embed_proj_dim": n}}
    kwargs = {**kwargs, **wide.get(family, {"hidden_size": n, "intermediate_size": 2 * n})}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**kwargs)).double().eval()
    linearize_(model, layout_of(model))
    return model


def _outlier_(model, family: str) -> None:
    """Make channel ``K`` of what every reader reads ``GAIN`` x the rest: the reader norms' scale (LayerNorm
    families), or the token embedding (OLMo 2, whose readers read the raw stream)."""
    layout = layout_of(model)
    with torch.no_grad():
        if family == "OLMo2":
            emb = model.get_submodule(layout.token_embedding).weight
            emb[:, K] = GAIN * emb.abs().max()
            return
        for b in layout.blocks:
            for spec in (b.attn_norm, b.mlp_norm):
                if spec is not None:
                    model.get_submodule(spec.path).weight[K] = GAIN


def _outlier_model(family: str):
    """``(model, layout, ids, float64 reference logits)``: the width-256 model with its outlier channel."""
    model = _wide(family)
    _outlier_(model, family)
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    return model, layout_of(model), ids, ref


def _a4_error(model, ids, ref, only: list[str]) -> float:
    """Relative logits error with per-token A4 on the linears named in ``only`` (the rest stay in float)."""
    others = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n not in only]
    quantize_model_(model, None, ActQuantConfig(bits=4), exclude=others)
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("family", ["StarCoder2", "Cohere", "Falcon", "GPT-2", "GPT-NeoX", "OLMo2", "OPT"])
def test_rotation_spreads_the_outlier_before_a4(family):
    """Exact in float64, the reader norms wrapped (stream site: the post-norms), and with A4 on the readers only
    the logits error at most 0.7x the unrotated one (measured 0.27-0.59x at width 256)."""
    model, layout, ids, ref = _outlier_model(family)
    rotated = copy.deepcopy(model)
    entry = rotate_model_(rotated, layout_of(rotated), seed=1, online=False)
    with torch.no_grad():
        assert float((rotated(ids).logits - ref).norm() / ref.norm()) < (1e-12 if entry["site"] == "readers" else 1e-6)
    wrapped = {n for n, m in rotated.named_modules() if isinstance(m, RotatedOutput)}
    assert wrapped == set(entry["rotated_outputs"]) and wrapped
    if entry["site"] == "readers":
        assert wrapped == {n.path for b in layout.blocks for n in (b.attn_norm, b.mlp_norm) if n is not None}
    readers = [r for b in layout.blocks for r in (*b.attn.readers, *b.mlp.readers)]
    plain, turned = _a4_error(model, ids, ref, readers), _a4_error(rotated, ids, ref, readers)
    assert turned < 0.7 * plain, (plain, turned)


@pytest.mark.parametrize("family", ["StarCoder2", "Falcon", "GPT-2", "GPT-NeoX", "OPT"])
def test_plain_mlp_online_hadamard_needs_its_signs(family):
    """GELU (ReLU for OPT) outputs are nearly non-negative: a bare Hadamard before the down projection gathers their
    mean into one coefficient.  With A4 on the down projections only, the bare transform is at least 2x worse than
    unrotated (measured 3.1-4.5x) and the signed one at most half the bare one.  For GELU the signed transform stays
    within 1.1x of unrotated (measured 0.75-1.01x); OPT's ReLU output is half exact zeros, which per-token A4 keeps
    exactly unrotated, and the signed transform measured 1.43x unrotated on this construction (bound 1.6x).  OPT's
    MLP has no module of its own: its transform rides on the activation module (``acts`` in the plan)."""
    model, layout, ids, ref = _outlier_model(family)
    downs = [b.mlp.writer for b in layout.blocks]
    errors = {}
    for signs in (True, False):
        turned = copy.deepcopy(model)
        entry = install_online_hadamard_(turned, layout_of(turned), seed=1)
        specs = {**entry["mlps"], **entry.get("acts", {})}
        assert len(specs) == len(layout.blocks) and all("signs_seed" in spec for spec in specs.values())
        assert ("acts" in entry) == (family == "OPT")
        if not signs:  # the same MLPs rebuilt around a bare Hadamard, W H fused
            turned = copy.deepcopy(model)
            for path, spec in specs.items():
                bare = {k: v for k, v in spec.items() if k != "signs_seed"}
                (_install_hadamard_act if path in entry.get("acts", {}) else _install_hadamard_mlp)(turned, path, bare,
                                                                                                     fuse=True)
        with torch.no_grad():
            assert float((turned(ids).logits - ref).norm() / ref.norm()) < 1e-12
        errors[signs] = _a4_error(turned, ids, ref, downs)
    plain = _a4_error(copy.deepcopy(model), ids, ref, downs)
    assert errors[False] > 2 * plain and errors[True] < 0.5 * errors[False], (plain, errors)
    assert errors[True] < (1.6 if family == "OPT" else 1.1) * plain, (plain, errors)


def test_opt_online_hadamard_rides_on_its_activation_and_rebuilds():
    """OPT's fc1 / fc2 sit on the decoder layer: the online transform wraps ``activation_fn`` (state dict unchanged),
    fc2 is fused with it, the float64 logits stay, and the plan entry rebuilds the wrappers on a fresh model."""
    from compression.rotation import apply_rotation_plan

    model = _wide("OPT")
    ids = torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        ref = model(ids).logits
    keys = set(model.state_dict())
    entry = rotate_model_(model, layout_of(model), seed=1)
    acts = entry["online"]["acts"]
    assert set(acts) == {f"model.decoder.layers.{i}.activation_fn" for i in range(2)} and not entry["online"]["mlps"]
    assert all(isinstance(model.get_submodule(p), HadamardAfterAct) for p in acts)
    assert set(model.state_dict()) == keys
    with torch.no_grad():
        assert float((model(ids).logits - ref).norm() / ref.norm()) < 1e-12
    fresh = _wide("OPT")
    assert sorted(apply_rotation_plan(fresh, entry)) == sorted(entry["rotated_outputs"] + list(acts))
    fresh.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert torch.equal(fresh(ids).logits, model(ids).logits)
