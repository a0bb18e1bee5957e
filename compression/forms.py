"""Weights in every form as ``nn.Linear``: one form for every method, statistic, quantizer and LoRA.

A projection ``y = x Wᵀ + b`` (``W: out x in``) is stored in several ways by ``transformers`` models:

- ``nn.Linear`` subclasses (Falcon's ``FalconLinear``): the same maths under another class.  Converted to a
  plain ``nn.Linear`` sharing nothing but the values, after checking on a random input that the module's
  forward *is* ``x Wᵀ + b`` (a subclass that computes something else is refused, naming it);
- ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W: in x out``; converted with ``W ← Wᵀ``;
- mixture-of-experts tensors (Mixtral, Qwen2-MoE): ``gate_up (n x 2I x E)``, ``down (n x E x I)``; each
  expert matrix becomes its own ``nn.Linear`` in :class:`LinearExperts`, which routes exactly like the
  original module (same top-k weights, same accumulation order), so the outputs are bit-identical.  GPT-OSS
  (form ``"gpt_oss"``) stores them the other way round (``gate_up (n x E x 2I)``, ``down (n x I x E)``, applied
  as ``x W + b``) with biases, interleaves gate and up (``h[..., ::2]``, ``h[..., 1::2]``) and clamps its SwiGLU
  (:class:`ClampedSwiGLU`); its experts become the same per-expert linears, with biases.

:func:`linearize_` returns a plain-data plan section (``"forms"``) that :func:`apply_forms_plan` replays on a
freshly built model before the low-rank layers are rebuilt (:func:`compression.plan.apply_plan`), so an
export of a linearized model loads back bit-exactly.  The router of a MoE block (``n x E``) stays as it is.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from compression.layout import ModelLayout

log = logging.getLogger(__name__)


def _conv1d_class() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for this package
        return None
    return Conv1D


def _ours(module: nn.Module) -> bool:
    """Linear subclasses this package defines (low-rank factors, quantized layers) stay as they are."""
    return type(module).__module__.startswith("compression.")


@torch.no_grad()
def is_linear_map(module: nn.Linear) -> bool:
    """Whether ``module(x) == x Wᵀ + b`` on a random input (float64 copy, relative 1e-9)."""
    w = module.weight.detach()
    x = torch.randn(3, module.in_features, dtype=w.dtype, device=w.device,
                    generator=torch.Generator(device=w.device).manual_seed(0))
    got, want = module(x), F.linear(x, w, module.bias)
    return (isinstance(got, torch.Tensor) and got.shape == want.shape
            and bool(torch.allclose(got, want, rtol=1e-5, atol=1e-6)))


@torch.no_grad()
def _plain_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    lin.weight.copy_(weight)
    if bias is not None:
        lin.bias.copy_(bias)
    return lin


class ClampedSwiGLU(nn.Module):
    """GPT-OSS's expert activation on the interleaved ``gate_up`` output ``h``: ``g = min(h[..., ::2], limit)``,
    ``u = clamp(h[..., 1::2], ±limit)``, ``(u + 1) · g · σ(α g)``."""

    def __init__(self, alpha: float, limit: float) -> None:
        super().__init__()
        self.alpha, self.limit = float(alpha), float(limit)

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        gate = gate_up[..., ::2].clamp(min=None, max=self.limit)
        up = gate_up[..., 1::2].clamp(min=-self.limit, max=self.limit)
        return (up + 1) * (gate * torch.sigmoid(gate * self.alpha))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, limit={self.limit}"


class LinearExperts(nn.Module):
    """Experts as per-expert ``nn.Linear``: ``<gate_up>.e: E -> 2I``, ``<down>.e: I -> E`` (``nn.ModuleList``
    named like the 3-D parameters they replace).  ``forward(x [T, E], top_k_index [T, k], top_k_weights [T, k])``
    routes exactly as the transformers experts module: ``Σ_k w_k · down_e(act(gate) * up)``, or, when ``act``
    takes the whole ``gate_up`` output (``fused_act``: GPT-OSS's :class:`ClampedSwiGLU`), ``down_e(act(gate_up))``.
    ``routed_input`` (Llama 4): ``forward(x [E·T, E_dim])`` takes every expert's copy of the tokens already scaled by
    its routing score (zero rows for the tokens not routed to it) and returns the experts' outputs in that layout;
    each expert runs on its nonzero rows only (a zero row's output is zero: no biases), so calibration sees the
    tokens routed to it.  ``hadamard``: an online transform applied to the activation's output before ``down``
    (set by rotation)."""

    def __init__(self, count: int, hidden: int, inter: int, act: nn.Module, names: tuple[str, str, str],
                 device=None, dtype=None, bias: bool = False, fused_act: bool = False,
                 routed_input: bool = False) -> None:
        super().__init__()
        if routed_input and bias:
            raise ValueError("routed_input experts have no biases (a zero row must give a zero output)")
        self.num_experts, self.names, self.fused_act, self.routed_input = count, tuple(names), fused_act, routed_input
        gate_up, down, act_name = self.names
        self.add_module(gate_up, nn.ModuleList(nn.Linear(hidden, 2 * inter, bias=bias, device=device, dtype=dtype)
                                               for _ in range(count)))
        self.add_module(down, nn.ModuleList(nn.Linear(inter, hidden, bias=bias, device=device, dtype=dtype)
                                            for _ in range(count)))
        self.add_module(act_name, act)
        self.hadamard: nn.Module | None = None

    def _expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        gate_up, down, act = (getattr(self, n) for n in self.names)
        if self.fused_act:
            h = act(gate_up[e](x))
        else:
            gate, up = gate_up[e](x).chunk(2, dim=-1)
            h = act(gate) * up
        if self.hadamard is not None:
            h = self.hadamard(h)
        return down[e](h)

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor | None = None,
                top_k_weights: torch.Tensor | None = None):
        if self.routed_input:
            return self._routed(hidden_states)
        if hidden_states.dim() > 2:  # DBRX passes [B, S, E] with the routing of its B·S tokens
            return self.forward(hidden_states.reshape(-1, hidden_states.shape[-1]), top_k_index,
                                top_k_weights).view(hidden_states.shape)
        out = torch.zeros_like(hidden_states)
        with torch.no_grad():
            mask = F.one_hot(top_k_index, num_classes=self.num_experts + 1).permute(2, 1, 0)
            hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
        for e in hit:
            e = int(e[0])
            if e == self.num_experts:
                continue
            pos, tokens = torch.where(mask[e])
            h = self._expert(e, hidden_states[tokens]) * top_k_weights[tokens, pos, None]
            out.index_add_(0, tokens, h.to(out.dtype))
        return out

    def _routed(self, routed: torch.Tensor) -> torch.Tensor:
        x = routed.view(self.num_experts, -1, routed.shape[-1])
        out = torch.zeros_like(x)
        for e in range(self.num_experts):
            rows = x[e].abs().amax(-1).nonzero()[:, 0]
            if rows.numel():
                out[e, rows] = self._expert(e, x[e, rows]).to(out.dtype)
        return out.view(-1, routed.shape[-1])


EXPERT_FORMS = ("mixtral", "gpt_oss", "llama4", "dbrx")


def _dbrx_experts(module: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """DBRX's ``mlp.w1`` (gate), ``mlp.v1`` (up) and ``mlp.w2`` (down, used as ``h w2``), each ``E·I x hidden`` with
    expert ``e`` in rows ``e·I .. (e+1)·I``, as ``(gate_up [E, 2I, hidden], down [E, hidden, I])``."""
    mlp = getattr(module, "mlp", None)
    weights = [getattr(mlp, n, None) for n in ("w1", "v1", "w2")]
    count = getattr(module, "num_experts", None)
    if not (isinstance(count, int) and all(isinstance(w, torch.Tensor) and w.dim() == 2 for w in weights)
            and len({w.shape for w in weights}) == 1 and weights[0].shape[0] % count == 0):
        raise ValueError(f"{type(module).__name__}: expected DBRX experts (num_experts and mlp.w1 / v1 / w2 of "
                         "shape [num_experts * I, hidden])")
    w1, v1, w2 = (w.view(count, -1, w.shape[1]) for w in weights)
    return torch.cat([w1, v1], dim=1), w2.transpose(1, 2)


@torch.no_grad()
def _linearize_experts(module: nn.Module, gate_up: str, down: str, act: str, form: str = "mixtral"
                       ) -> LinearExperts:
    if form not in EXPERT_FORMS:
        raise ValueError(f"experts form must be one of {EXPERT_FORMS}, got {form!r}")
    if form == "dbrx":
        gu, dn = _dbrx_experts(module)
    else:
        gu, dn = getattr(module, gate_up), getattr(module, down)
        if not (isinstance(gu, torch.Tensor) and gu.dim() == 3 and isinstance(dn, torch.Tensor) and dn.dim() == 3):
            raise ValueError(f"{type(module).__name__}: expected 3-D expert tensors {gate_up!r} and {down!r}")
    if form in ("gpt_oss", "llama4"):  # stored for x W (E x hidden x 2I, E x I x hidden)
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    if form == "gpt_oss":  # biases, the clamped SwiGLU on interleaved gate/up
        biases = (getattr(module, f"{gate_up}_bias"), getattr(module, f"{down}_bias"))
        activation, fused = ClampedSwiGLU(module.alpha, module.limit), True
    elif form == "dbrx":  # the activation lives on the weights' module
        biases, activation, fused = None, module.mlp.activation_fn, False
    else:  # Llama 4's inputs arrive already scaled by the routing (routed_input)
        biases, activation, fused = None, getattr(module, act), False
    count, two_inter, hidden = gu.shape
    new = LinearExperts(count, hidden, two_inter // 2, activation, (gate_up, down, act), device=gu.device,
                        dtype=gu.dtype, bias=biases is not None, fused_act=fused, routed_input=form == "llama4")
    for e in range(count):
        getattr(new, gate_up)[e].weight.copy_(gu[e])
        getattr(new, down)[e].weight.copy_(dn[e])
        if biases is not None:
            getattr(new, gate_up)[e].bias.copy_(biases[0][e])
            getattr(new, down)[e].bias.copy_(biases[1][e])
    return new


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def linearize_(model: nn.Module, layout: ModelLayout | None = None) -> dict:
    """Convert every ``Conv1D``, every foreign ``nn.Linear`` subclass and (with ``layout``) every block's 3-D
    experts to ``nn.Linear`` form, in place, function unchanged; return the ``"forms"`` plan section."""
    conv1d = _conv1d_class()
    entry: dict = {"conv1d": [], "linear": [], "experts": {}}
    # a MoE router stays as it is, whatever its class (Phi-3.5-MoE's is an nn.Linear subclass returning the routing)
    routers = set(layout.routers()) if layout is not None else set()
    for name, module in list(model.named_modules()):
        if conv1d is not None and type(module) is conv1d:
            _set(model, name, _plain_linear(module.weight.T, module.bias))
            entry["conv1d"].append(name)
        elif (isinstance(module, nn.Linear) and type(module) is not nn.Linear and not _ours(module)
              and name not in routers):
            if not is_linear_map(module):
                raise NotImplementedError(f"{name} is a {type(module).__name__}, an nn.Linear subclass whose forward "
                                          "is not x Wᵀ + b; it cannot be compressed as a linear layer")
            _set(model, name, _plain_linear(module.weight, module.bias))
            entry["linear"].append(name)
    for block in layout.blocks if layout is not None else ():
        spec = block.mlp.experts
        if spec is None or isinstance(model.get_submodule(spec.path), LinearExperts):
            continue
        _set(model, spec.path, _linearize_experts(model.get_submodule(spec.path), spec.gate_up, spec.down, spec.act,
                                                  spec.form))
        entry["experts"][spec.path] = {"gate_up": spec.gate_up, "down": spec.down, "act": spec.act,
                                       **({"form": spec.form} if spec.form != "mixtral" else {})}
    n = len(entry["conv1d"]) + len(entry["linear"]) + len(entry["experts"])
    if n:
        log.info("linearized %d Conv1D, %d Linear subclasses, %d expert modules", len(entry["conv1d"]),
                 len(entry["linear"]), len(entry["experts"]))
    return {k: v for k, v in entry.items() if v}


@torch.no_grad()
def apply_forms_plan(model: nn.Module, entry: Mapping) -> list[str]:
    """Replay :func:`linearize_` on a freshly built model (values are loaded afterwards)."""
    changed = []
    conv1d = _conv1d_class()
    for name in entry.get("conv1d", []):
        module = model.get_submodule(name)
        if type(module) is nn.Linear:
            continue
        if conv1d is None or type(module) is not conv1d:
            raise ValueError(f"forms plan: {name!r} is a {type(module).__name__}, expected Conv1D")
        _set(model, name, _plain_linear(module.weight.T, module.bias))
        changed.append(name)
    for name in entry.get("linear", []):
        module = model.get_submodule(name)
        if type(module) is not nn.Linear:
            _set(model, name, _plain_linear(module.weight, module.bias))
            changed.append(name)
    for name, spec in entry.get("experts", {}).items():
        module = model.get_submodule(name)
        if not isinstance(module, LinearExperts):
            _set(model, name, _linearize_experts(module, spec["gate_up"], spec["down"], spec["act"],
                                                 spec.get("form", "mixtral")))
            changed.append(name)
    return changed


__all__ = ["ClampedSwiGLU", "LinearExperts", "apply_forms_plan", "is_linear_map", "linearize_"]
