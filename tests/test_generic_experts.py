"""Experts of families without a layout (``compression.forms``): modules in the transformers experts interface are
linearized in whichever reading of their 3-D weights reproduces them on a probe, so that their matrices are compressed
like a layout family's; a module no reading reproduces stays as it is, named in a warning.  The families are tiny
models from ``tests/test_transformers_families.py`` (which checks every generic family exact at full rank after this
conversion, with the number of experts modules each converts)."""

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


def test_experts_no_reading_reproduces_stay_as_they_are_and_are_named(caplog):
    """Ergo's experts have a ``down_proj`` and an ``up_proj`` of the plain shapes but compute otherwise: the plain
    reading is tried, misses by O(1) on the probe, and is not taken.  HY-V4's clamp their gate and have no ``act_fn``:
    no reading is tried.  Both modules stay as they were, named in a warning."""
    for model_type, path, words in (("ergo", "model.layers.1.mlp.experts", "do not reproduce its output"),
                                    ("hy_v4", "model.layers.1.mlp.experts", "in a form this package does not read")):
        model = _build(model_type)
        before = type(model.get_submodule(path))
        caplog.clear()
        with caplog.at_level("WARNING", logger="compression.forms"):
            forms = linearize_(model)
        assert "experts" not in forms and type(model.get_submodule(path)) is before
        assert f"{path} ({before.__name__})" in caplog.text and words in caplog.text, caplog.text
        if model_type == "ergo":  # the plain reading's difference on the probe is named: O(1), not rounding
            assert float(caplog.text.split("relative difference ")[1].split(" ")[0]) > 0.1
