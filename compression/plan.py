"""The compression plan: what was factorized, at which rank, as plain JSON-able data.

A plan rebuilds the factored *structure* of a model without any calibration data, so a
compressed state dict (or checkpoint) can be loaded into a freshly built dense model::

    {"format": "svd-vggt/plan", "version": 1,
     "method": {"name": "svd_llm", "beta": 0.5, ...}, "ratio": 0.2, "allocation": "uniform",
     "layers": {"model.layers.0.self_attn.q_proj":
                {"rank": 96, "in_features": 576, "out_features": 576, "bias": false}, ...}}

Optional sections, each rebuilt by :func:`apply_plan` in this order:

- ``"forms"``: ``Conv1D`` / ``nn.Linear`` subclasses / 3-D experts converted to ``nn.Linear`` form
  (:mod:`compression.forms`);
- ``"rotation"``: residual-stream rotation and online Hadamard (:mod:`compression.rotation`);
- ``"joint_groups"``: ``{"model.layers.0.self_attn": {"members": ["q_proj", "k_proj", "v_proj"],
  "rank": 240, "in_features": 576, "out_features": [576, 192, 192], "bias": [false, false, false]}}``
  (:mod:`compression.joint`);
- ``"layers"`` as above;
- ``"quantization"``: ``{"weight": {...}, "act": {...}, "layers": [names of QuantLinear]}``
  (:mod:`compression.quant`), applied last because it names the factors of low-rank layers.
"""

from __future__ import annotations

import json
import os

from torch import nn

from compression.io import atomic_write_text
from compression.lowrank import LowRankLinear

PLAN_FORMAT = "svd-vggt/plan"
PLAN_VERSION = 1


def make_plan(method: dict, ratio: float, allocation: str, layers: dict[str, dict],
              joint_groups: dict[str, dict] | None = None, quantization: dict | None = None,
              rotation: dict | None = None, forms: dict | None = None) -> dict:
    plan = {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "method": dict(method),
        "ratio": float(ratio),
        "allocation": allocation,
        "layers": {name: dict(spec) for name, spec in layers.items()},
    }
    for key, value in (("joint_groups", joint_groups), ("quantization", quantization), ("rotation", rotation),
                       ("forms", forms)):
        if value:
            plan[key] = value
    return plan


def merge_plans(*plans: dict) -> dict:
    """One plan from several steps (e.g. rotation, joint QKV, per-matrix SVD, quantization).

    ``method``/``ratio``/``allocation`` come from the last plan; sections are merged, and a
    layer or group planned twice is an error.
    """
    if not plans:
        raise ValueError("merge_plans needs at least one plan")
    for p in plans:
        validate_plan(p)
    out = make_plan(plans[-1]["method"], plans[-1]["ratio"], plans[-1]["allocation"], {})
    for p in plans:
        for key in ("layers", "joint_groups"):
            clash = set(out.get(key, {})) & set(p.get(key, {}))
            if clash:
                raise ValueError(f"plans both define {key} {sorted(clash)[:3]}")
            if p.get(key):
                out.setdefault(key, {}).update(p[key])
        for key in ("quantization", "rotation", "forms"):
            if key in p:
                if key in out:
                    raise ValueError(f"plans both define a {key!r} section")
                out[key] = p[key]
    return out


def validate_plan(plan: dict) -> None:
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a compression plan (expected format {PLAN_FORMAT!r})")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan version {plan.get('version')} is not supported (this code reads {PLAN_VERSION})")
    for name, spec in plan["layers"].items():
        missing = {"rank", "in_features", "out_features", "bias"} - set(spec)
        if missing:
            raise ValueError(f"plan entry for layer {name!r} lacks {sorted(missing)}")
    for name, spec in plan.get("joint_groups", {}).items():
        missing = {"members", "rank", "in_features", "out_features", "bias"} - set(spec)
        if missing:
            raise ValueError(f"plan entry for joint group {name!r} lacks {sorted(missing)}")
    if "quantization" in plan and "layers" not in plan["quantization"]:
        raise ValueError("plan section 'quantization' lacks 'layers'")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Replace every planned ``nn.Linear`` by a :class:`LowRankLinear` of the planned rank.

    The factors are freshly initialised: load the compressed weights afterwards.  Layers
    already low-rank at the planned rank are left alone (so applying twice changes
    nothing).  Every entry is checked before anything is replaced; returns the names changed.
    Optional ``rotation`` / ``joint_groups`` / ``quantization`` sections are rebuilt too (see
    the module docstring); their changed names are included.
    """
    validate_plan(plan)
    changed: list[str] = []
    if plan.get("forms"):
        from compression.forms import apply_forms_plan

        changed += apply_forms_plan(model, plan["forms"])
    if "rotation" in plan:
        from compression.rotation import apply_rotation_plan

        changed += apply_rotation_plan(model, plan["rotation"])
    if plan.get("joint_groups"):
        from compression.joint import apply_joint_plan

        changed += apply_joint_plan(model, plan["joint_groups"])
    changed += _apply_lowrank(model, plan)
    if "quantization" in plan:
        from compression.quant import apply_quant_plan

        changed += apply_quant_plan(model, plan["quantization"])
    return changed


def _apply_lowrank(model: nn.Module, plan: dict) -> list[str]:
    todo: list[tuple[str, nn.Linear, int]] = []
    for name, spec in plan["layers"].items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"plan names layer {name!r}, which this model does not have") from None
        shape = (int(spec["out_features"]), int(spec["in_features"]))
        if isinstance(module, LowRankLinear):
            if (module.out_features, module.in_features, module.rank) != (*shape, int(spec["rank"])):
                raise ValueError(f"layer {name!r} is already low-rank with a different shape or rank than planned")
            continue
        if not isinstance(module, nn.Linear):
            raise ValueError(f"plan layer {name!r} is a {type(module).__name__}, expected nn.Linear")
        if (module.out_features, module.in_features) != shape or (module.bias is not None) != bool(spec["bias"]):
            raise ValueError(
                f"plan layer {name!r} expects shape {shape} bias={spec['bias']}, model has "
                f"{(module.out_features, module.in_features)} bias={module.bias is not None}; "
                "the plan belongs to a different model configuration"
            )
        todo.append((name, module, int(spec["rank"])))
    for name, module, rank in todo:
        set_submodule(model, name, LowRankLinear.from_linear(module, rank))
    return [name for name, _, _ in todo]


def merge_lowrank_(model: nn.Module) -> list[str]:
    """Replace every :class:`LowRankLinear` by its merged dense ``nn.Linear``; returns the names."""
    names = [n for n, m in model.named_modules() if isinstance(m, LowRankLinear)]
    for name in names:
        set_submodule(model, name, model.get_submodule(name).to_linear())
    return names


def save_plan(plan: dict, path: str | os.PathLike) -> None:
    """Write the plan as JSON atomically."""
    validate_plan(plan)
    atomic_write_text(path, json.dumps(plan, indent=1, sort_keys=True))


def load_plan(path: str | os.PathLike) -> dict:
    with open(path) as f:
        plan = json.load(f)
    validate_plan(plan)
    return plan
