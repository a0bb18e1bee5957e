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
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from torch import nn

from compression.io import atomic_write_text, read_json
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


def validate_plan(plan: dict, source: str | os.PathLike | None = None) -> None:
    """Check the plan's structure and types; each problem raises one ``ValueError`` naming the field.

    ``source`` (e.g. the file the plan was read from) prefixes the messages.  Checked: format and
    version, ``method`` / ``ratio`` / ``allocation``, and every layer, joint group, quantization
    and rotation entry (integer ranks ``1 <= rank <= min(in, out)``, positive integer sizes,
    boolean biases).  Unknown top-level keys are allowed (later versions may add fields).
    """
    where = f"compression plan {source}" if source else "compression plan"

    def fail(msg: str) -> NoReturn:
        raise ValueError(f"{where}: {msg}")

    if not isinstance(plan, dict):
        fail(f"expected a JSON object (dict), got {type(plan).__name__}")
    if plan.get("format") != PLAN_FORMAT:
        fail(f"'format' is {plan.get('format')!r}, expected {PLAN_FORMAT!r}: this is not a compression plan")
    if plan.get("version") != PLAN_VERSION:
        fail(f"version {plan.get('version')!r} is not supported (this code reads version {PLAN_VERSION})")
    if "layers" not in plan:
        fail("lacks the 'layers' section (a plan without per-matrix low-rank layers has \"layers\": {})")
    if not isinstance(plan.get("method"), dict) or not isinstance(plan["method"].get("name"), str):
        fail(f"'method' must be an object with a string 'name', got {plan.get('method')!r}")
    ratio = plan.get("ratio")
    if not _is_number(ratio) or not 0.0 <= ratio < 1.0:
        fail(f"'ratio' must be a number in [0, 1) (fraction of parameters removed), got {ratio!r}")
    if not isinstance(plan.get("allocation"), str):
        fail(f"'allocation' must be a string, got {plan.get('allocation')!r}")
    if not isinstance(plan["layers"], dict):
        fail(f"'layers' must map layer names to entries, got {type(plan['layers']).__name__}")
    for name, spec in plan["layers"].items():
        _check_entry(fail, f"layer {name!r}", spec, {"rank", "in_features", "out_features", "bias"})
        for key in ("in_features", "out_features"):
            _check_int(fail, f"layer {name!r}", key, spec[key])
        if not isinstance(spec["bias"], bool):
            fail(f"layer {name!r}: 'bias' must be true or false, got {spec['bias']!r}")
        _check_rank(fail, f"layer {name!r}", spec["rank"], min(spec["in_features"], spec["out_features"]))
    groups = plan.get("joint_groups", {})
    if not isinstance(groups, dict):
        fail(f"'joint_groups' must map attention-module names to entries, got {type(groups).__name__}")
    for name, spec in groups.items():
        what = f"joint group {name!r}"
        _check_entry(fail, what, spec, {"members", "rank", "in_features", "out_features", "bias"})
        members, outs, biases = spec["members"], spec["out_features"], spec["bias"]
        if not (isinstance(members, list) and members and all(isinstance(m, str) for m in members)):
            fail(f"{what}: 'members' must be a non-empty list of child names, got {members!r}")
        if len(set(members)) != len(members):
            fail(f"{what}: 'members' {members} repeats a name")
        if not (isinstance(outs, list) and len(outs) == len(members)):
            fail(f"{what}: 'out_features' must list one size per member {members}, got {outs!r}")
        if not (isinstance(biases, list) and len(biases) == len(members) and all(isinstance(b, bool) for b in biases)):
            fail(f"{what}: 'bias' must list true/false per member {members}, got {biases!r}")
        _check_int(fail, what, "in_features", spec["in_features"])
        for out in outs:
            _check_int(fail, what, "out_features", out)
        _check_rank(fail, what, spec["rank"], min(spec["in_features"], sum(outs)))
    if "quantization" in plan:
        quant = plan["quantization"]
        if not isinstance(quant, dict) or "layers" not in quant:
            fail("section 'quantization' lacks 'layers'")
        if not (isinstance(quant["layers"], list) and all(isinstance(n, str) for n in quant["layers"])):
            fail(f"'quantization.layers' must be a list of layer names, got {quant['layers']!r}")
        for key in ("weight", "act"):
            if not (quant.get(key) is None or isinstance(quant[key], dict)):
                fail(f"'quantization.{key}' must be an object or null, got {quant[key]!r}")
    if "rotation" in plan and not isinstance(plan["rotation"], dict):
        fail(f"section 'rotation' must be an object, got {plan['rotation']!r}")


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_entry(fail: Callable[[str], NoReturn], what: str, spec: object, keys: set[str]) -> None:
    if not isinstance(spec, dict):
        fail(f"{what}: entry must be an object, got {spec!r}")
    missing = keys - set(spec)
    if missing:
        fail(f"{what}: entry lacks {sorted(missing)}")


def _check_int(fail: Callable[[str], NoReturn], what: str, key: str, value: object) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        fail(f"{what}: {key!r} must be a positive integer, got {value!r}")


def _check_rank(fail: Callable[[str], NoReturn], what: str, rank: object, limit: int) -> None:
    if not isinstance(rank, int) or isinstance(rank, bool):
        fail(f"{what}: 'rank' must be an integer, got {rank!r} ({type(rank).__name__})")
    if rank < 1:
        fail(f"{what}: 'rank' must be >= 1, got {rank}")
    if rank > limit:
        fail(f"{what}: 'rank' {rank} exceeds min(in_features, out_features) = {limit}, the largest rank "
             "a factorization of that shape can have")


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


def check_model_matches_plan(model: nn.Module, plan: dict) -> None:
    """Raise ``ValueError`` unless ``model`` has exactly the structure :func:`apply_plan` builds.

    Every planned layer / joint member / quantized layer must exist with the planned type,
    shape, rank and bias, and no low-rank layer, joint projection or quantized layer may exist
    that the plan does not list (its weights would be saved but never rebuilt on load); online
    Hadamard MLPs are exactly those the rotation section lists.  All differences are
    reported together.
    """
    from compression.joint import JointProjection
    from compression.quant import QuantLinear
    from compression.rotation import HadamardMLP

    validate_plan(plan)
    modules = dict(model.named_modules())
    problems: list[str] = []
    for name, spec in plan["layers"].items():
        want = (spec["out_features"], spec["in_features"], spec["rank"], spec["bias"])
        problems += _structure_problem(modules.get(name), LowRankLinear, f"layer {name!r}", want)
    joint_names = set()
    for gname, spec in plan.get("joint_groups", {}).items():
        for member, out, bias in zip(spec["members"], spec["out_features"], spec["bias"]):
            full = f"{gname}.{member}" if gname else member
            joint_names.add(full)
            want = (out, spec["in_features"], spec["rank"], bias)
            problems += _structure_problem(modules.get(full), JointProjection, f"joint member {full!r}", want)
    quantized = set(plan["quantization"]["layers"]) if "quantization" in plan else set()
    for name in sorted(quantized):
        if not isinstance(modules.get(name), QuantLinear):
            got = type(modules[name]).__name__ if name in modules else "missing"
            problems.append(f"quantized layer {name!r} is {got}, the plan says QuantLinear")
    for kind, names in ((LowRankLinear, set(plan["layers"])), (JointProjection, joint_names), (QuantLinear, quantized)):
        extra = sorted(n for n, m in modules.items() if isinstance(m, kind) and n not in names)
        if extra:
            problems.append(f"{len(extra)} {kind.__name__} layer(s) the plan does not list: {extra[:3]}")
    have = {n for n, m in modules.items() if isinstance(m, HadamardMLP)}
    want = set(((plan.get("rotation") or {}).get("online") or {}).get("mlps", {}))
    if have != want:
        problems.append(f"online-Hadamard MLPs differ from the plan's rotation section: only in the model "
                        f"{sorted(have - want)[:3]}, only in the plan {sorted(want - have)[:3]}")
    if problems:
        raise ValueError("the model does not match the compression plan (was it compressed by another plan, or "
                         "changed after compression?): " + "; ".join(problems[:8])
                         + (f"; ... ({len(problems) - 8} more)" if len(problems) > 8 else ""))


def _structure_problem(module: nn.Module | None, kind: type, what: str, want: tuple) -> list[str]:
    """``[]`` when ``module`` is a ``kind`` with ``(out, in, rank, bias) == want``, else one message."""
    if module is None:
        return [f"{what} does not exist in the model"]
    if not isinstance(module, kind):
        return [f"{what} is a {type(module).__name__}, the plan says {kind.__name__}"]
    got = (module.out_features, module.in_features, module.rank, module.up.bias is not None)
    if got != want:
        return [f"{what} has (out, in, rank, bias) = {got}, the plan says {want}"]
    return []


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
    """Read and validate a plan written by :func:`save_plan` (or ``save_compressed``)."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"compression plan {path} not found; compression.save_plan and "
                                "compression.export.save_compressed write it (compression_plan.json)")
    plan = read_json(path)
    validate_plan(plan, source=path)
    return plan
