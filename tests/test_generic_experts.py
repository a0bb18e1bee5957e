"""Experts of families without a layout (``compression.forms``): modules in the transformers experts interface are
linearized in whichever reading of their 3-D weights reproduces them on a probe (the class's own gate included), so
that their matrices are compressed like a layout family's; a module no reading reproduces stays as it is, named in a
warning.  The families are tiny models from ``tests/test_transformers_families.py`` (which checks every generic family
exact at full rank after this conversion, with the number of experts modules each converts)."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
import torch

from compression import Recipe, compress_
from compression.export import load_compressed, save_compressed
from compression.forms import FunctionActivation, LinearExperts, linearize_
from lightning_modules.specs import CausalLMSpec
from tests.test_transformers_families import _build

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("model_type, path, form, first, width", [
    ("lfm2_moe", "model.layers.1.feed_forward.experts", None, "gate_up_proj", 64),  # act_fn = F.silu, a function
    ("aria_text", "model.layers.0.mlp.experts", "transposed", "gate_up_proj", 128),  # stored for x W
    ("nemotron_h", "model.layers.1.mixer.experts", "plain", "up_proj", 32),  # down(act(up(x)))
    ("hy_v4", "model.layers.1.mlp.experts", None, "gate_up_proj", 64),  # its own clamped gate, rebuilt on load
])
def test_each_reading_is_exact_and_its_export_loads_back_bit_exact(model_type, path, form, first, width):
    model = _build(model_type)
    g = torch.Generator().manual_seed(2)
    batches = [{"input_ids": torch.randint(3, 128, (4, 24), generator=g)} for _ in range(2)]
    ids = batches[0]["input_ids"][:2]
    with torch.no_grad():
        ref = model(input_ids=ids).logits
    spec = CausalLMSpec(model=model)
    model = spec.build()
    experts = model.get_submodule(path)
    assert isinstance(experts, LinearExperts)
    assert spec.forms["experts"][path] == {"gate_up": first, "down": "down_proj", "act": "act_fn",
                                           **({"form": form} if form else {})}
    assert getattr(experts, first)[0].out_features == width
    assert isinstance(experts.act_fn, FunctionActivation) == (model_type == "lfm2_moe")
    with torch.no_grad():
        assert float((model(input_ids=ids).logits - ref).norm() / ref.norm()) <= 1e-6
    targets = spec.default_targets(model)
    assert {f"{path}.{first}.0", f"{path}.down_proj.3"} <= set(targets)
    report = compress_(model, Recipe("svd_llm", ratio=0.3, targets=targets), family=spec, batches=batches)
    assert {f"{path}.{first}.0", f"{path}.down_proj.3"} <= {layer.name for layer in report.layers}
    plan = report.plan
    assert plan["forms"] == spec.forms  # the export carries the conversion
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
        save_compressed(model, Path(tmp) / "export", plan)
        loaded, _ = load_compressed(Path(tmp) / "export", dtype=torch.float32)
        assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)


class HiddenClamp(torch.nn.Module):
    """Experts in the interface, Mixtral's shapes and an ``act_fn``, that clamp the gate at 5 inside ``forward`` (not
    in an ``_apply_gate``): the plain reading matches at the probe's unit scale and misses once the gate passes 5."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.gate_up_proj = torch.nn.Parameter(0.1 * torch.randn(4, 16, 8, generator=g))
        self.down_proj = torch.nn.Parameter(0.1 * torch.randn(4, 8, 8, generator=g))
        self.act_fn = torch.nn.SiLU()

    def forward(self, hidden_states, top_k_index, top_k_weights):
        out = torch.zeros_like(hidden_states)
        for t in range(hidden_states.shape[0]):
            for j in range(top_k_index.shape[1]):
                e = int(top_k_index[t, j])
                gate, up = torch.nn.functional.linear(hidden_states[t], self.gate_up_proj[e]).chunk(2)
                h = self.act_fn(gate.clamp(max=5.0)) * up
                out[t] += top_k_weights[t, j] * torch.nn.functional.linear(h, self.down_proj[e])
        return out


def test_experts_no_reading_reproduces_stay_as_they_are_and_are_named(caplog):
    """A hidden clamp: the reading is tried, misses on the scaled probe, and is not taken.  Ergo's experts (a norm per
    expert, ``up_proj`` stored for ``x W``): no reading is tried.  Both stay as they were, named in a warning."""
    model = torch.nn.Module()
    model.experts = HiddenClamp()
    with caplog.at_level("WARNING", logger="compression.forms"):
        assert linearize_(model) == {}
    assert type(model.experts) is HiddenClamp
    assert "experts (HiddenClamp) has 3-D expert weights but per-expert linears do not reproduce" in caplog.text
    assert float(caplog.text.split("relative difference ")[1].split(" ")[0]) > 0.1
    model, path = _build("ergo"), "model.layers.1.mlp.experts"
    caplog.clear()
    with caplog.at_level("WARNING", logger="compression.forms"):
        assert "experts" not in linearize_(model)
    assert type(model.get_submodule(path)).__name__ == "ErgoExperts"
    assert f"{path} (ErgoExperts) holds 3-D expert weights (up_proj, down_proj) in a form this package does not read" \
        in caplog.text


@pytest.mark.parametrize("model_type, path", [("deepseek_v4", "model.layers.0.mlp.experts"),
                                              ("hy_v4", "model.layers.1.mlp.experts")])
def test_a_family_gate_of_its_own_is_kept(model_type, path):
    """DeepSeek-V4 and HY-V4 clamp the gate and up halves in their ``_apply_gate``: the per-expert linears run that very
    method (on a copy of the module holding no weights), exact at both probe scales, where the plain ``act(gate) * up``
    reading would miss DeepSeek-V4's by O(1) on the scaled probe."""
    from compression.forms import OwnGate, _as_module, _probe_difference

    model = _build(model_type)
    old = model.get_submodule(path)
    forms = linearize_(model)
    new = model.get_submodule(path)
    assert path in forms["experts"] and isinstance(new.act_fn, OwnGate) and new.fused_act
    assert not list(new.act_fn.parameters()) and not list(new.act_fn.children())
    assert _probe_difference(old, new) <= 1e-5
    if hasattr(old, "act_fn"):  # DeepSeek-V4 has an act_fn beside its clamps
        plain = LinearExperts(4, 32, old.down_proj.shape[2], _as_module(old.act_fn), new.names)
        plain.load_state_dict(new.state_dict())
        assert _probe_difference(old, plain) > 1.0
