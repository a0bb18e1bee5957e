"""The matrices a run factorizes, built from its targeted layers: joint q/k/v groups and overrides.

A targeted ``nn.Linear`` with weight ``W`` (``m x n``) is one matrix, keyed by the layer's name.  With
``joint_qkv`` the q/k/v projections of one attention module, which read the same input ``X``, are one
matrix ``[W_q; W_k; W_v]`` (``(m_q + m_k + m_v) x n``, keyed by the attention module's name) factorized
with one shared down projection (:mod:`compression.joint`); the model family's ``joint_groups(model,
names)`` says which projections form each group, and a group counts only when all its members are
targeted.

An override (``overrides: {pattern: {rank: r} | {ratio: ρ}}``) fixes a matrix's rank or ratio outside the
allocation: the first pattern matching the matrix's key or any of its members wins; a pattern that
matches no matrix is an error naming the targeted ones.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from torch import nn

from compression.allocation import Matrix
from compression.finite import all_finite
from compression.targets import name_matches


def build_matrices(model: nn.Module, names: Sequence[str], joint_qkv: bool = False,
                   joint_groups: Callable | None = None) -> dict[str, Matrix]:
    """``key -> Matrix`` for the targeted layers ``names`` (joint groups first, then single layers in
    ``names`` order); a layer whose weight holds NaN/inf is refused.  ``joint_groups``: the family's hook,
    required with ``joint_qkv``."""
    modules = {n: model.get_submodule(n) for n in names}
    for name, layer in modules.items():
        if layer.weight.device.type != "meta" and not all_finite(layer.weight):  # meta: streamed
            raise FloatingPointError(f"weight of layer {name!r} contains NaN/inf; refusing to compress it")
    groups: dict[str, list[str]] = {}
    if joint_qkv:
        if joint_groups is None:
            raise ValueError("joint_qkv needs the model family's joint_groups (which projections form q/k/v: "
                             "the model layout); pass family= (e.g. CausalLMSpec(model=model))")
        found = joint_groups(model, names)
        groups = {g: list(m) for g, m in found.items() if all(n in modules for n in m)}
        if not groups:
            raise ValueError("joint_qkv: true but no attention module has all of its q/k/v projections among "
                             "the targets; target them (e.g. targets: [q_proj, k_proj, v_proj, ...]) or set "
                             "joint_qkv: false")
    matrices: dict[str, Matrix] = {}
    members = {n for g in groups.values() for n in g}
    for key, group in groups.items():
        layers = [modules[n] for n in group]
        matrices[key] = Matrix(key, tuple(group), tuple(x.out_features for x in layers), layers[0].in_features)
    for name in names:
        if name not in members:
            matrices[name] = Matrix(name, (name,), (modules[name].out_features,), modules[name].in_features)
    return matrices


def fixed_by_overrides(matrices: Mapping[str, Matrix], overrides: Mapping[str, Mapping]) -> dict[str, dict]:
    """``key -> spec`` (``{"rank": r}`` or ``{"ratio": ρ}``) for every matrix an override pattern matches."""
    for pattern in overrides:
        if not any(name_matches(n, pattern) for m in matrices.values() for n in (m.key, *m.members)):
            shown = ", ".join(list(matrices)[:8]) + (", ..." if len(matrices) > 8 else "")
            raise ValueError(f"override pattern {pattern!r} matches no eligible targeted layer or joint group; "
                             f"targeted: {shown}")
    fixed: dict[str, dict] = {}
    for key, matrix in matrices.items():
        for pattern, spec in overrides.items():  # first match wins; a group matches by name or member
            if any(name_matches(n, pattern) for n in (key, *matrix.members)):
                fixed[key] = dict(spec)
                break
    return fixed


__all__ = ["build_matrices", "fixed_by_overrides"]
