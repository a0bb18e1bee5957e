"""The modules a rotation installs (:mod:`compression.rotation` places them): the online transforms that run
in the forward pass and hold no stored state of their own (non-persistent buffers, rebuilt from the plan).

- :class:`StreamRotation`: ``x -> x Q`` (random signs and a fast Hadamard, or a dense matrix);
- :class:`RotatedOutput`: a norm (or any module) whose output is rotated, sharing the inner module's parameters;
- :class:`SignedHadamard`: ``h -> (h ⊙ s) H``, the online Hadamard before a down projection;
- :class:`HadamardMLP` / :class:`HadamardAfterAct`: an MLP, or the activation of an MLP with no module of its
  own, with that transform before its down projection.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from compression.hadamard import HadamardTransform, is_hadamard_order, random_signs, rotation_matrix


class StreamRotation(nn.Module):
    """``x [..., n] -> x Q`` for ``Q = rotation_matrix(n, kind, seed)``: random signs then a fast Hadamard when
    ``Q`` is a (randomized) Hadamard, else the dense matrix.  Non-persistent buffers (rebuilt from the plan)."""

    def __init__(self, n: int, kind: str, seed: int) -> None:
        super().__init__()
        self.n, self.kind, self.seed = n, kind, seed
        self.fast = kind in ("hadamard", "random_hadamard") and is_hadamard_order(n)
        if self.fast:
            self.hadamard = HadamardTransform(n)
            signs = random_signs(n, seed) if kind == "random_hadamard" else torch.ones(n, dtype=torch.float64)
            self.register_buffer("signs", signs, persistent=False)
        else:
            self.register_buffer("matrix", rotation_matrix(n, kind, seed), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fast:
            return self.hadamard(x * self.signs.to(x.dtype))
        return x @ self.matrix.to(x.dtype)


class RotatedOutput(nn.Module):
    """``y -> inner(y) Q``: a norm whose output enters the rotated stream (a post-norm) or rotated readers (a reader
    norm rotated at the readers, scale kept).  It *shares* the inner module's
    parameters (same names, so state-dict keys do not change); the rotation has no stored state."""

    def __init__(self, inner: nn.Module, rotation: StreamRotation) -> None:
        super().__init__()
        self._parameters = inner._parameters  # shared dict: moves, casts and loads reach the inner module
        self._buffers = inner._buffers
        object.__setattr__(self, "inner", inner)
        self.rotation = rotation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.rotation(self.inner(x))


class SignedHadamard(nn.Module):
    """``h -> (h ⊙ s) H`` with random signs ``s`` (``signs_seed``), or ``h -> h H`` (``None``); nothing stored."""

    def __init__(self, n: int, signs_seed: int | None) -> None:
        super().__init__()
        self.transform = HadamardTransform(n)
        self.register_buffer("signs", None if signs_seed is None else random_signs(n, signs_seed), persistent=False)

    def matrix(self) -> torch.Tensor:
        """Dense float64 ``M`` with ``forward(h) = h M``."""
        m = self.transform.matrix()
        return m if self.signs is None else self.signs.double().cpu()[:, None] * m

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.transform(h if self.signs is None else h * self.signs.to(h.dtype))


class HadamardMLP(nn.Module):
    """An MLP computing ``down(H(inner activations))`` with an online Hadamard ``H``; same child names as the
    MLP it replaces.  ``kind`` / ``roles`` come from the layout (:class:`compression.layout.MLP`): ``gated``
    ``act(gate(x)) * up(x)``, ``gated_fused`` ``act(g) * u`` with ``g, u = chunk(gate_up(x))``, ``plain``
    ``act(fc(x))``.

    ``signs_seed``: random signs before ``H`` (``h ↦ (h ⊙ s) H``).  A plain MLP's activations (GELU, ReLU²) are
    nearly all non-negative, and a bare Hadamard gathers their mean into its first coefficient, one outlier per
    token that a per-token activation quantizer then has to span (measured: the A4 error of the down projection
    3-4x *worse* than unrotated on GPT-2, GPT-NeoX, Falcon and StarCoder2 shapes); the signs remove it.  A gated
    MLP's activations are signed, and its plans keep the bare ``H`` they were written with."""

    def __init__(self, mlp: nn.Module, kind: str, roles: Mapping[str, str], signs_seed: int | None = None) -> None:
        super().__init__()
        if kind not in ("gated", "gated_fused", "plain"):
            raise ValueError(f"HadamardMLP supports gated, gated_fused and plain MLPs, not {kind!r}")
        for name, child in mlp.named_children():
            self.add_module(name, child)
        self.kind, self.roles = kind, dict(roles)
        self.hadamard = SignedHadamard(getattr(self, self.roles["down"]).in_features, signs_seed)

    def matrix(self) -> torch.Tensor:
        """The online transform as a dense float64 matrix ``M`` (``forward`` feeds ``down`` with ``h M``)."""
        return self.hadamard.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = {role: getattr(self, name) for role, name in self.roles.items()}
        if self.kind == "gated":
            h = r["act"](r["gate"](x)) * r["up"](x)
        elif self.kind == "gated_fused":
            gate, up = r["gate_up"](x).chunk(2, dim=-1)
            h = r["act"](gate) * up
        else:
            h = r["act"](r["fc"](x))
        return r["down"](self.hadamard(h))


class HadamardAfterAct(nn.Module):
    """``x -> (act(x) ⊙ s) H``: the online Hadamard of an MLP that has no module of its own (OPT's ``fc1`` /
    ``fc2`` sit on the decoder layer), placed on its activation module, which runs right before the down
    projection; ``act`` keeps its own (parameter-free or not) state under ``act``."""

    def __init__(self, act: nn.Module, n: int, signs_seed: int | None) -> None:
        super().__init__()
        self.act = act
        self.hadamard = SignedHadamard(n, signs_seed)

    def matrix(self) -> torch.Tensor:
        return self.hadamard.matrix()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.hadamard(self.act(x))


__all__ = ["HadamardAfterAct", "HadamardMLP", "RotatedOutput", "SignedHadamard", "StreamRotation"]
