"""The compression plan: what was factorized, at which rank, as plain JSON-able data.

A plan rebuilds the factored *structure* of a model without any calibration data, so a
compressed state dict (or checkpoint) can be loaded into a freshly built dense model::

    {"format": "svd-vggt/plan", "version": 1,
     "method": {"name": "svd_llm", "beta": 0.5, ...}, "ratio": 0.2, "allocation": "uniform",
     "layers": {"model.layers.0.self_attn.q_proj":
                {"rank": 96, "in_features": 576, "out_features": 576, "bias": false}, ...}}
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from torch import nn

from compression.lowrank import LowRankLinear

PLAN_FORMAT = "svd-vggt/plan"
PLAN_VERSION = 1


def make_plan(method: dict, ratio: float, allocation: str, layers: dict[str, dict]) -> dict:
    return {
        "format": PLAN_FORMAT,
        "version": PLAN_VERSION,
        "method": dict(method),
        "ratio": float(ratio),
        "allocation": allocation,
        "layers": {name: dict(spec) for name, spec in layers.items()},
    }


def validate_plan(plan: dict) -> None:
    if not isinstance(plan, dict) or plan.get("format") != PLAN_FORMAT:
        raise ValueError(f"not a compression plan (expected format {PLAN_FORMAT!r})")
    if plan.get("version") != PLAN_VERSION:
        raise ValueError(f"plan version {plan.get('version')} is not supported (this code reads {PLAN_VERSION})")
    for name, spec in plan["layers"].items():
        missing = {"rank", "in_features", "out_features", "bias"} - set(spec)
        if missing:
            raise ValueError(f"plan entry for layer {name!r} lacks {sorted(missing)}")


def set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(model: nn.Module, plan: dict) -> list[str]:
    """Replace every planned ``nn.Linear`` by a :class:`LowRankLinear` of the planned rank.

    The factors are freshly initialised: load the compressed weights afterwards.  Layers
    already low-rank at the planned rank are left alone (so applying twice changes
    nothing).  Every entry is checked before anything is replaced; returns the names changed.
    """
    validate_plan(plan)
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
    """Write the plan as JSON atomically (temp file in the same folder, then rename)."""
    validate_plan(plan)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(plan, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_plan(path: str | os.PathLike) -> dict:
    with open(path) as f:
        plan = json.load(f)
    validate_plan(plan)
    return plan
