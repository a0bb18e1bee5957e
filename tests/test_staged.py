"""Staged calibration within a block (``calibration.staged``, :mod:`compression.staged`).

- the groups and their order come from one hooked forward: q/k/v -> o -> gate/up -> down on LLaMA; a matrix
  kept dense merges its group into the next stage; layers called twice / never, and joint matrices across
  inputs, are refused; so are staged without the sequential mode and with a method that reads no statistics;
- at full rank (factorization = the dense weight up to rounding) staged gives the unstaged factors;
- in the second block of two, the o_proj / gate,up / down_proj statistics are the Grams of their inputs
  computed with the compressed block 0 and the compressed earlier layers of block 1, by an explicit reference
  forward; with dense targets the cross Grams pair those inputs with the fully dense model's.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from compression import Recipe, compress_
from compression.pipeline import CompressionPipeline
from compression.sequential import SequentialRun
from compression.staged import input_groups, plan_stages
from lightning_modules.specs import CausalLMSpec
from tests.conftest import layer_inputs
from tests.test_sequential import _batches, _llama

pytestmark = pytest.mark.usefixtures("one_thread")

SEQ = {"mode": "sequential", "propagate": "compressed", "progress": False}
ATTN, MLP = "model.layers.0.self_attn.", "model.layers.0.mlp."
LAYERS = [ATTN + p for p in ("q_proj", "k_proj", "v_proj", "o_proj")] + [MLP + p for p in ("gate_proj", "up_proj",
                                                                                             "down_proj")]


def test_llama_groups_in_call_order():
    model, batch = _llama(layers=1), _batches(count=1)[0]
    block = model.model.layers[0]
    names = {n[len("model.layers.0."):]: n for n in reversed(LAYERS)}  # the order given does not matter
    captured = {}
    handle = block.register_forward_pre_hook(lambda _m, a, k: captured.update(args=a, kwargs=k), with_kwargs=True)
    with torch.no_grad():
        model(**batch)
    handle.remove()
    groups = input_groups(block, names, lambda blk: blk(*captured["args"], **captured["kwargs"]))
    assert groups == [LAYERS[:3], LAYERS[3:4], LAYERS[4:6], LAYERS[6:]]


def test_plan_stages_merges_groups_that_stay_dense():
    groups = [["q", "k", "v"], ["o"], ["g", "u"], ["d"]]
    members = {n: [n] for g in groups for n in g}
    stages = plan_stages(groups, members, lambda k: True)
    assert [s.names for s in stages] == groups
    kept = {"q", "k", "v", "u", "g"}  # q/k/v and gate/up kept dense: they change nothing
    stages = plan_stages(groups, members, lambda k: k not in kept)
    assert [s.names for s in stages] == [["q", "k", "v", "o", "g", "u"], ["d"]]
    assert [sorted(s.keys) for s in stages] == [["g", "k", "o", "q", "u", "v"], ["d"]]
    stages = plan_stages(groups, members, lambda k: k not in {"o", "d"})  # o, down kept dense
    assert [s.names for s in stages] == [["q", "k", "v", "o"], ["g", "u", "d"]]
    assert [s.names for s in plan_stages(groups, members, lambda k: False)] == [sum(groups, [])]
    joint = {"qkv": ["q", "k", "v"], "o": ["o"], "g": ["g"], "u": ["u"], "d": ["d"]}
    assert [s.keys for s in plan_stages(groups, joint, lambda k: True)] == [["qkv"], ["o"], ["g", "u"], ["d"]]
    with pytest.raises(ValueError, match="matrix 'ko' joins layers"):
        plan_stages(groups, {"ko": ["k", "o"]}, lambda k: True)


class _Twice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.unused = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 4)

    def forward(self, x):
        return self.a(self.b(self.a(x)))


def test_input_groups_refuse_what_has_no_place_in_the_order():
    block, x = _Twice(), torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"\['a'\] run more than once"):
        input_groups(block, {"a": "a", "b": "b"}, lambda blk: blk(x))
    with pytest.raises(ValueError, match=r"\['unused'\] were not reached"):
        input_groups(block, {"b": "b", "unused": "unused"}, lambda blk: blk(x))
    assert input_groups(block, {"b": "b"}, lambda blk: blk(x)) == [["b"]]


def test_recipe_refusals_name_what_to_change():
    with pytest.raises(ValueError, match="set mode: sequential or staged: false"):
        Recipe("svd_llm", calibration={"staged": True})
    with pytest.raises(ValueError, match="method 'svd' reads no statistics; set staged: false"):
        Recipe("svd", calibration={**SEQ, "staged": True})
    recipe = Recipe("svd_llm", allocation="gradient", calibration={**SEQ, "staged": True})
    assert recipe.calibration.staged and recipe.all_at_once().calibration.staged is False
    # it changes the factors: a checkpoint of one does not resume as the other
    assert recipe.differences(Recipe("svd_llm", allocation="gradient", calibration=SEQ)) == [
        "calibration.staged: False -> True"]


def test_streamed_weights_staged_equals_loaded_staged(tmp_path):
    """stream_weights (one block read from disk at a time) runs the same stages on the same block."""
    from tests.test_sequential_streaming import _fit, _module, _save

    _save(tmp_path / "dense")
    loaded = _fit(_module(tmp_path / "dense", "float64", staged=True))
    streamed = _fit(_module(tmp_path / "dense", "float64", staged=True, stream_weights=True))
    plain = _fit(_module(tmp_path / "dense", "float64"))
    assert [r["stages"] for r in streamed.report.blocks] == [r["stages"] for r in loaded.report.blocks] == [4, 4]
    expected, got = loaded.model.state_dict(), streamed.model.state_dict()
    assert got.keys() == expected.keys()
    for key, value in expected.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
    assert any(not torch.equal(v, plain.model.state_dict()[k]) for k, v in expected.items() if ".o_proj." in k)


FULL = {"*q_proj": {"rank": 64}, "*k_proj": {"rank": 32}, "*v_proj": {"rank": 32}, "*o_proj": {"rank": 64},
        "*gate_proj": {"rank": 64}, "*up_proj": {"rank": 64}, "*down_proj": {"rank": 64}}


def _product(module: nn.Module) -> torch.Tensor:
    return (module.up.weight @ module.down.weight).detach()


@pytest.mark.parametrize("method", ["svd_llm", "asvd"])
def test_full_rank_staged_equals_unstaged(method):
    """Full ranks: every factorized layer computes its dense weight (up to rounding), so every stage sees the
    dense block's inputs and staging changes the factors only by rounding."""
    model, batches = _llama(), _batches(count=6)
    runs = []
    for staged in (False, True):
        m = copy.deepcopy(model)
        report = compress_(m, Recipe(method, ratio=0.4, overrides=FULL, calibration={**SEQ, "staged": staged}),
                           family=CausalLMSpec(model=m), batches=batches)
        runs.append((m, report))
    (plain, rp), (staged, rs) = runs
    assert [r["stages"] for r in rs.blocks] == [4, 4] and all("stages" not in r for r in rp.blocks)
    assert [(x.name, x.rank) for x in rs.layers] == [(x.name, x.rank) for x in rp.layers] and len(rs.layers) == 14
    for layer in rs.layers:
        got, want = _product(staged.get_submodule(layer.name)), _product(plain.get_submodule(layer.name))
        torch.testing.assert_close(got, want, rtol=0, atol=1e-9 * float(want.abs().max()), msg=layer.name)
        torch.testing.assert_close(got, model.get_submodule(layer.name).weight, rtol=0, atol=1e-7)
    assert rs.blocks[1]["output_error"] < 1e-12


def _with(model: nn.Module, source: nn.Module, names: list[str]) -> nn.Module:
    """A copy of ``model`` with the layers ``names`` taken from ``source`` (the compressed ones)."""
    out = copy.deepcopy(model)
    for name in names:
        parent, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent), child, copy.deepcopy(source.get_submodule(name)))
    return out


@pytest.mark.parametrize("dense_targets", [False, True])
def test_stage_statistics_are_taken_through_the_compressed_layers(dense_targets):
    """2 blocks at ratio 0.4, block 1 checked: o_proj's Gram is that of the attention output computed with the
    compressed block 0 and compressed q/k/v, gate/up's and down_proj's with every earlier layer compressed;
    with dense targets the cross Gram is (X_d - X_c)ᵀ X_c with X_d from the dense model.  The Grams of the
    unstaged driver (block 1 dense on the compressed block 0's outputs) differ."""
    model, batches = _llama(), _batches(count=6)
    grams: dict[str, tuple] = {}

    def observer(event, info):
        if event == "stats":
            for name in info["stats"].layers():
                s = info["stats"][name]
                grams[name] = (info["stage"], s.gram.clone(), s.cross.clone() if s.cross is not None else None)

    staged = copy.deepcopy(model)
    cal = {**SEQ, "staged": True, "dense_targets": dense_targets}
    pipe = CompressionPipeline(staged, Recipe("svd_llm", ratio=0.4, calibration=cal), CausalLMSpec(model=staged))
    SequentialRun(pipe, observer=observer).run(batches)
    second = [n.replace("layers.0.", "layers.1.") for n in LAYERS]
    assert {n: g[0] for n, g in grams.items()} == dict(zip(LAYERS + second, [0, 0, 0, 1, 2, 2, 3] * 2))
    dense_in = layer_inputs(model, second, batches)
    unstaged = layer_inputs(_with(model, staged, LAYERS), second, batches)
    for k, name in ((3, second[3]), (4, second[4]), (6, second[6])):
        x = layer_inputs(_with(model, staged, LAYERS + second[:k]), [name], batches)[name]
        _, gram, cross = grams[name]
        scale = float(gram.diagonal().max())
        torch.testing.assert_close(gram, x.T @ x, rtol=1e-10, atol=1e-10 * scale, msg=name)
        plain = unstaged[name].T @ unstaged[name]
        assert float((gram - plain).norm()) > 1e-3 * float(plain.norm()), name
        if dense_targets:
            torch.testing.assert_close(cross, (dense_in[name] - x).T @ x, rtol=1e-10, atol=1e-10 * scale, msg=name)
        else:
            assert cross is None
