"""The residual rotation must not make weight quantization worse where a reader norm drops massive inputs.

Gemma-3-270M collapsed under rotated weight quantization (docs/results/second_llm.md): its stream carries massive
channels in every token that its reader norms scale by ``1 + w`` = 0 to 0.8.  Folding such a scale into the
readers (``W diag(s)``, the fused stream rotation) makes them orthogonal to the massive input only in float; the
rotated quantization error of every column meets it.  The construction below reproduces it on tiny float64
models: channel ``K`` of every token embedding is made massive and every reader norm (and the final one) scales
it by ``S_K``; then the logits error of W8 RTN (every linear but the head) is compared with and without rotation.

Bounds: without the fold, rotating random weights by a random Hadamard neither helps nor hurts per-row RTN much
(measured ratio 1.11 on Gemma3, 0.92 on LLaMA here), so the rotated error must stay below ``2x`` the unrotated one.  The
folding site on the same construction is >= 10x worse (measured 174x on LLaMA), which shows the check bites.
"""

from __future__ import annotations

import copy

import pytest
import torch

from benchmarks.architectures import build
from compression import WeightQuantConfig
from compression.quant import quantize_model_
from compression.rotation import rotate_model_
from models.layouts import layout_of

K, MASSIVE, S_K = 5, 200.0, 1e-3


def _massive_channel_(model) -> torch.Tensor:
    """Make channel ``K`` of the stream massive and let every reader norm (and the final one) nearly drop it."""
    layout = layout_of(model)
    with torch.no_grad():
        emb = model.get_submodule(layout.token_embedding).weight
        emb[:, K] = MASSIVE * emb.abs().max()
        for spec in [layout.final_norm] + [n for b in layout.blocks for n in (b.attn_norm, b.mlp_norm)]:
            model.get_submodule(spec.path).weight[K] = S_K - spec.offset
    return torch.randint(3, 128, (2, 24), generator=torch.Generator().manual_seed(3))


def _w8_error(model, ids, ref) -> float:
    quantize_model_(model, WeightQuantConfig(bits=8, clip=False), None)
    with torch.no_grad():
        out = model(ids).logits
    return float((out - ref).norm() / ref.norm())


def _errors(family: str, site: str | None = None) -> tuple[float, float]:
    """Relative logits error of W8 RTN without and with the rotation (``site``: :func:`rotate_model_`'s)."""
    model = build(family)
    ids = _massive_channel_(model)
    with torch.no_grad():
        ref = model(ids).logits
    rotated = copy.deepcopy(model)
    entry = rotate_model_(rotated, layout_of(rotated), seed=1, site=site)
    with torch.no_grad():  # the norms compute in float32; folded, their rounding is amplified by ~1/S_K too
        assert float((rotated(ids).logits - ref).norm() / ref.norm()) < (1e-9 if entry["site"] == "readers" else 1e-4)
    return _w8_error(model, ids, ref), _w8_error(rotated, ids, ref), entry["site"]


@pytest.mark.parametrize(("family", "site", "chosen"), [("Gemma3", None, "readers"), ("LLaMA", "readers", "readers")])
def test_rotation_at_the_readers_keeps_w8_error_near_unrotated(family, site, chosen):
    plain, rotated, used = _errors(family, site)
    assert used == chosen
    assert rotated < 2 * plain, (plain, rotated)


def test_folding_a_suppressing_norm_scale_breaks_w8():
    """The fused stream rotation folds the scales: exact in float, >= 10x the W8 error (measured 174x)."""
    plain, rotated, used = _errors("LLaMA")
    assert used == "stream"
    assert rotated > 10 * plain, (plain, rotated)


def test_post_norm_layouts_refuse_the_folding_site():
    model = build("Gemma3")
    with pytest.raises(ValueError, match="rotated at the readers"):
        rotate_model_(model, layout_of(model), site="stream")
    with pytest.raises(ValueError, match="'stream' or 'readers'"):
        rotate_model_(model, layout_of(model), site="both")
