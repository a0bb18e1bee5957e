"""Block-sequential compression with the gradient allocation (``calibration.mode: sequential`` +
``allocation: gradient``): the ranks come from the dense model first, exactly as all-at-once decides them
(:func:`compression.api.dense_importances`), then the blocks are factorized one by one at those ranks.

- the ranks (and with ``dense_above_break_even`` which matrices stay dense) equal the all-at-once ranks
  whichever propagation; ``propagate: dense`` gives the all-at-once factors (float64, 1e-12);
- ``propagate: compressed`` keeps block 0's factors and changes block 1's (the error reaches its Grams);
- through Lightning (the model waiting on the host, ``block_device: cpu``) dense propagation gives the
  all-at-once stages' model;
- refused where it cannot work: streamed weights (the dense model is never whole), and a driver called
  without importances.
"""

from __future__ import annotations

import copy

import pytest
import torch

from compression import Recipe, compress_
from compression.api import dense_importances
from compression.pipeline import CompressionPipeline
from compression.sequential import SequentialRun
from lightning_modules.specs import CausalLMSpec
from tests.test_sequential import SEQ, _assert_same, _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")


def _ranks(report) -> dict[str, int]:
    return {k: v["rank"] for k, v in report.plan["layers"].items()}


def _run(model, batches, propagate: str | None, **fields):
    model = copy.deepcopy(model)
    calibration = {"progress": False} if propagate is None else {**SEQ, "propagate": propagate}
    report = compress_(model, Recipe("svd_llm", allocation="gradient", calibration=calibration, **fields),
                       family=CausalLMSpec(model=model), batches=batches)
    return model, report


@pytest.mark.parametrize("break_even", [False, True])
def test_sequential_gradient_ranks_are_the_all_at_once_ranks(break_even):
    model, batches = _llama(), _batches()
    a, ra = _run(model, batches, None, ratio=0.2, dense_above_break_even=break_even)
    d, rd = _run(model, batches, "dense", ratio=0.2, dense_above_break_even=break_even)
    c, rc = _run(model, batches, "compressed", ratio=0.2, dense_above_break_even=break_even)
    assert _ranks(rc) == _ranks(rd) == _ranks(ra)
    assert len(set(_ranks(ra).values())) > 3  # a real (non-uniform) allocation
    kept_dense = 14 - len(ra.plan["layers"])  # 7 targeted matrices per block
    assert (kept_dense > 0) == break_even
    assert rc.params_ratio == ra.params_ratio
    _assert_same(a, d, ra, rd)  # dense propagation: the all-at-once factors
    sa, sc = a.state_dict(), c.state_dict()
    first = [k for k in sa if k.startswith("model.layers.0.")]
    later = [k for k in sa if k.startswith("model.layers.1.") and ".down." in k]
    assert first and later
    assert all(torch.equal(sa[k], sc[k]) for k in first)  # block 0 sees the same inputs
    assert all(not torch.equal(sa[k], sc[k]) for k in later)  # block 1 calibrates on block 0's error


def test_dense_importances_are_computed_on_the_dense_model():
    """The importances compress_ hands the sequential driver equal those of the all-at-once pipeline, and
    computing them leaves the model untouched."""
    model, batches = _llama(), _batches()
    before = copy.deepcopy(model.state_dict())
    recipe = Recipe("svd_llm", ratio=0.3, allocation="gradient", calibration=SEQ)
    got = dense_importances(model, recipe, family=CausalLMSpec(model=model), batches=batches)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    from compression.api import prepare

    ref = prepare(copy.deepcopy(model), Recipe("svd_llm", ratio=0.3, allocation="gradient"),
                  family=CausalLMSpec(model=model), batches=batches).importances
    assert got.keys() == ref.keys() and len(got) == 14
    for key in ref:
        torch.testing.assert_close(got[key], ref[key], rtol=1e-10, atol=0)


def test_sequential_gradient_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="stream_weights never holds the dense model: set stream_weights: false"):
        Recipe("svd_llm", allocation="gradient", calibration={"mode": "sequential", "stream_weights": True})
    Recipe("svd_llm", allocation="v2", calibration={"mode": "sequential", "stream_weights": True})  # still fine
    model = _llama()
    pipe = CompressionPipeline(model, Recipe("svd_llm", allocation="gradient", calibration=SEQ),
                               CausalLMSpec(model=model))
    with pytest.raises(ValueError, match="pass importances="):
        SequentialRun(pipe).run(_batches())
    seq = Recipe("svd_llm", allocation="gradient", dense_above_break_even=True,
                 calibration={"mode": "sequential", "propagate": "dense", "gradient_batches": 3})
    plain = seq.all_at_once()
    assert plain.calibration.mode == "all_at_once" and plain.calibration.gradient_batches == 3
    assert plain.differences(seq) == ["calibration.mode: 'sequential' -> 'all_at_once'",
                                      "calibration.propagate: 'dense' -> 'compressed'"]


def test_lightning_sequential_gradient_matches_the_all_at_once_stages(tmp_path):
    from tests.lightning_helpers import compress_tiny_llama

    def fit(calibration):
        return compress_tiny_llama(tmp_path, Recipe("svd_llm", ratio=0.2, allocation="gradient",
                                                    dense_above_break_even=True, calibration=calibration))

    dense = fit({"progress": False})
    seq = fit({**SEQ, "block_device": "cpu"})
    assert seq.plan["layers"] == dense.plan["layers"] and len(seq.report.blocks) == 2
    assert 0 < len(dense.plan["layers"]) < 14  # some matrices kept dense by the break-even rule
    for key, value in dense.model.state_dict().items():
        torch.testing.assert_close(seq.model.state_dict()[key], value, rtol=0, atol=1e-6)
