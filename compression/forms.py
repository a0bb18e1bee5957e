"""Weights in every form as ``nn.Linear``: one form for every method, statistic, quantizer and LoRA.

A projection ``y = x Wᵀ + b`` (``W: out x in``) is stored in several ways by ``transformers`` models:

- ``nn.Linear`` subclasses (Falcon's ``FalconLinear``): the same maths under another class.  Converted to a
  plain ``nn.Linear`` sharing nothing but the values, after checking on a random input that the module's
  forward *is* ``x Wᵀ + b`` (a subclass that computes something else stays as it is, named in a warning, and is no
  compression target: the target filter skips every class but ``nn.Linear``);
- ``Conv1D`` (GPT-2): ``y = x W + b`` with ``W: in x out``; converted with ``W ← Wᵀ``;
- mixture-of-experts tensors (Mixtral, Qwen2-MoE): ``gate_up (n x 2I x E)``, ``down (n x E x I)``; each
  expert matrix becomes its own ``nn.Linear`` in :class:`LinearExperts`, which routes exactly like the
  original module (same top-k weights, same accumulation order), so the outputs are bit-identical.  GPT-OSS
  (form ``"gpt_oss"``) stores them the other way round (``gate_up (n x E x 2I)``, ``down (n x I x E)``, applied
  as ``x W + b``) with biases, interleaves gate and up (``h[..., ::2]``, ``h[..., 1::2]``) and clamps its SwiGLU
  (:class:`ClampedSwiGLU`); its experts become the same per-expert linears, with biases.  DBRX (form ``"dbrx"``)
  keeps flat ``E·I x n`` matrices ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2``.

Families without a layout (:func:`linearize_` with ``layout=None``) are searched for experts modules in the
transformers experts interface: ``forward(hidden_states, top_k_index, top_k_weights)``, no biases, a 3-D
``down_proj`` and either a 3-D ``gate_up_proj`` (gated; stored ``E x 2I x n`` as in Mixtral, or ``E x n x 2I`` for
``x W`` as in Aria) with an ``act_fn`` (a module or a function) or a gate of the class's own (``_apply_gate``:
DeepSeek-V4's and HY-V4's clamps, run as :class:`OwnGate`), or a 3-D ``up_proj`` with an ``act_fn`` (plain,
``down(act(up(x)))``: NemotronH).  The marks transformers' experts decorator leaves on the class
(``is_transposed``, ``has_gate``, ``is_concatenated``, ``has_bias``, ``has_post_expert_norm``) choose the reading,
else the shapes do.  A module is linearized only when the per-expert linears give its own output on a random probe,
at unit scale and scaled until the first projections reach about 100 (a clamp the reading left out shows there):
every expert reached, relative difference at most :data:`PROBE_RTOL` of the dtype.  One that matches no reading
(per-expert norms, interleaved gate/up, weights applied elsewhere) stays as it is with a warning naming it, and its
matrices are not compressed.

:func:`linearize_` returns a plain-data plan section (``"forms"``) that :func:`apply_forms_plan` replays on a
freshly built model before the low-rank layers are rebuilt (:func:`compression.plan.apply_plan`), so an
export of a linearized model loads back bit-exactly.  The router of a MoE block (``n x E``) stays as it is.
"""

from __future__ import annotations

import copy
import inspect
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
    """Whether ``module(x) == x Wᵀ + b`` on a random input ``[3, in_features]`` (a forward that fails on it, like
    DeepSeek-V4's grouped output projection reshaping its input into groups, is not)."""
    w = module.weight.detach()
    x = torch.randn(3, module.in_features, dtype=w.dtype, device=w.device,
                    generator=torch.Generator(device=w.device).manual_seed(0))
    try:
        got = module(x)
    except (RuntimeError, ValueError, TypeError, IndexError):
        return False
    want = F.linear(x, w, module.bias)
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
    takes the whole ``gate_up`` output (``fused_act``: GPT-OSS's :class:`ClampedSwiGLU`, or plain experts whose first
    projection is ``up`` alone, ``gate_up_width = I``: NemotronH), ``down_e(act(gate_up))``.
    ``routed_input`` (Llama 4): ``forward(x [E·T, E_dim])`` takes every expert's copy of the tokens already scaled by
    its routing score (zero rows for the tokens not routed to it) and returns the experts' outputs in that layout;
    each expert runs on its nonzero rows only (a zero row's output is zero: no biases), so calibration sees the
    tokens routed to it.  ``hadamard``: an online transform applied to the activation's output before ``down``
    (set by rotation)."""

    def __init__(self, count: int, hidden: int, inter: int, act: nn.Module, names: tuple[str, str, str],
                 device=None, dtype=None, bias: bool = False, fused_act: bool = False,
                 routed_input: bool = False, gate_up_width: int | None = None) -> None:
        super().__init__()
        if routed_input and bias:
            raise ValueError("routed_input experts have no biases (a zero row must give a zero output)")
        self.num_experts, self.names, self.fused_act, self.routed_input = count, tuple(names), fused_act, routed_input
        gate_up, down, act_name = self.names
        width = 2 * inter if gate_up_width is None else gate_up_width
        self.add_module(gate_up, nn.ModuleList(nn.Linear(hidden, width, bias=bias, device=device, dtype=dtype)
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


EXPERT_FORMS = ("mixtral", "gpt_oss", "llama4", "dbrx", "transposed", "plain")
"""How a family stores its experts (:func:`_linearize_experts`): ``mixtral`` ``gate_up (E x 2I x n)``, ``down
(E x n x I)``; ``gpt_oss`` / ``llama4`` / ``transposed`` (Aria) the same stored for ``x W`` (``E x n x 2I``,
``E x I x n``), with GPT-OSS's biases and clamped SwiGLU or Llama 4's routed input; ``dbrx`` flat matrices;
``plain`` one ``up (E x I x n)`` and ``down(act(up(x)))`` (NemotronH)."""


class FunctionActivation(nn.Module):
    """A plain function used as an experts module's activation (LFM2-MoE's ``act_fn = F.silu``) as a module."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fn(x)

    def extra_repr(self) -> str:
        return getattr(self.fn, "__name__", repr(self.fn))


def _as_module(act) -> nn.Module:
    return act if isinstance(act, nn.Module) else FunctionActivation(act)


class OwnGate(nn.Module):
    """A gated experts module's own ``_apply_gate(gate_up)`` (DeepSeek-V4's, Bailing's and HY-V4's clamp the gate and
    up halves), as the fused activation of its :class:`LinearExperts`.  It runs on a shallow copy of the experts module
    that holds none of its weights (its limits, activation and config are what the gate reads)."""

    def __init__(self, experts: nn.Module) -> None:
        super().__init__()
        owner = copy.copy(experts)
        owner._parameters, owner._buffers = {}, {}
        # children without weights only (an activation module): nothing of the experts' weights stays alive here
        owner._modules = {k: m for k, m in experts._modules.items()
                          if m is not None and next(iter(m.parameters()), None) is None}
        object.__setattr__(self, "owner", owner)  # not a submodule: no second experts module in the tree

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        return type(self.owner)._apply_gate(self.owner, gate_up)

    def extra_repr(self) -> str:
        return f"{type(self.owner).__name__}._apply_gate"


def _own_gate(module: nn.Module) -> bool:
    """Whether ``module``'s class gates its ``gate_up`` output in its own ``_apply_gate``, not transformers' default
    ``act(gate) * up``."""
    gate = getattr(type(module), "_apply_gate", None)
    return callable(gate) and getattr(gate, "__module__", "") != "transformers.integrations.moe"


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
    if form in ("gpt_oss", "llama4", "transposed"):  # stored for x W (E x hidden x 2I, E x I x hidden)
        gu, dn = gu.transpose(1, 2), dn.transpose(1, 2)
    if form == "gpt_oss":  # biases, the clamped SwiGLU on interleaved gate/up
        biases = (getattr(module, f"{gate_up}_bias"), getattr(module, f"{down}_bias"))
        activation, fused = ClampedSwiGLU(module.alpha, module.limit), True
    elif form == "dbrx":  # the activation lives on the weights' module
        biases, activation, fused = None, module.mlp.activation_fn, False
    elif form in ("mixtral", "transposed") and _own_gate(module):  # the family's clamped or scaled gate, exactly
        biases, activation, fused = None, OwnGate(module), True
    else:  # Llama 4's inputs arrive already scaled by the routing (routed_input); plain: act on the whole up
        biases, activation, fused = None, _as_module(getattr(module, act)), form == "plain"
    count, width, hidden = gu.shape
    new = LinearExperts(count, hidden, dn.shape[2], activation, (gate_up, down, act), device=gu.device,
                        dtype=gu.dtype, bias=biases is not None, fused_act=fused, routed_input=form == "llama4",
                        gate_up_width=width)
    for e in range(count):
        getattr(new, gate_up)[e].weight.copy_(gu[e])
        getattr(new, down)[e].weight.copy_(dn[e])
        if biases is not None:
            getattr(new, gate_up)[e].bias.copy_(biases[0][e])
            getattr(new, down)[e].bias.copy_(biases[1][e])
    return new


PROBE_RTOL = {torch.float64: 1e-10, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}
"""Largest relative difference (Frobenius) between a generic experts module and its per-expert linears on the probe,
by dtype: a few roundings for the same products in another order; a misread layout is off by O(1)."""


def _experts_interface(module: nn.Module) -> bool:
    """Whether ``module`` is called as transformers' experts modules are, ``forward(hidden_states, top_k_index,
    top_k_weights)``, and holds 3-D weights of its own (tested first: the signature is read only for such modules,
    not for every module of the model)."""
    if not any(p.dim() == 3 for p in module.parameters(recurse=False)):
        return False
    try:
        params = list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return False
    return params[:3] == ["hidden_states", "top_k_index", "top_k_weights"]


def _generic_expert_forms(module: nn.Module) -> list[tuple[str, str]]:
    """``[(form, first projection's name)]``: the readings of ``module``'s 3-D expert weights (see the module
    docstring), to be tried on the probe in this order; ``[]`` for any other module.  Where transformers' experts
    decorator has marked the class (``is_transposed``, ``has_gate``, ``is_concatenated``, ``has_bias``,
    ``has_post_expert_norm``), the marks choose the reading; otherwise the shapes do."""
    dn = getattr(module, "down_proj", None)
    if not (isinstance(dn, nn.Parameter) and dn.dim() == 3) or dn.is_meta or not _experts_interface(module):
        return []
    if getattr(module, "gate_up_proj_bias", None) is not None or getattr(module, "down_proj_bias", None) is not None:
        return []
    if (getattr(module, "has_bias", False) or getattr(module, "has_post_expert_norm", False)
            or getattr(module, "is_concatenated", True) is False):
        return []  # biases, a norm after each expert, interleaved gate/up: no reading here
    count, a, b = dn.shape
    gu, up = getattr(module, "gate_up_proj", None), getattr(module, "up_proj", None)
    transposed = getattr(module, "is_transposed", None)
    gated = getattr(module, "has_gate", True) is not False
    forms = []
    if gated and isinstance(gu, nn.Parameter) and gu.dim() == 3 and (_own_gate(module) or callable(
            getattr(module, "act_fn", None))):
        if gu.shape == (count, 2 * b, a) and transposed is not True:  # down n x I: gate_up 2I x n
            forms.append(("mixtral", "gate_up_proj"))
        if gu.shape == (count, b, 2 * a) and transposed is not False:  # down I x n (for x W): gate_up n x 2I
            forms.append(("transposed", "gate_up_proj"))
    elif (not gated or gu is None) and isinstance(up, nn.Parameter) and up.dim() == 3 and up.shape == (count, b, a) \
            and callable(getattr(module, "act_fn", None)) and transposed is not True:
        forms.append(("plain", "up_proj"))
    return forms


@torch.no_grad()
def _probe_difference(old: nn.Module, new: LinearExperts) -> float:
    """Relative difference (Frobenius) of ``new``'s output from ``old``'s on random tokens routed to every expert
    (two experts a token where there are two, random weights)."""
    ref = old.down_proj
    count, hidden = new.num_experts, getattr(new, new.names[1])[0].out_features
    g = torch.Generator(device="cpu").manual_seed(0)
    tokens, k = 2 * count + 3, min(2, count)
    x = torch.randn(tokens, hidden, generator=g, dtype=torch.float64).to(ref.device, ref.dtype)
    index = torch.rand(tokens, count, generator=g).argsort(-1)[:, :k].to(ref.device)
    weights = torch.rand(tokens, k, generator=g, dtype=torch.float64).to(ref.device, ref.dtype)
    first = getattr(new, new.names[0])
    # a second probe scaled so that the first projections' outputs reach about 100: a clamp or saturation the reading
    # left out shows there (random weights keep them near 0.1, far under any limit)
    reach = max(float(first[e](x).abs().amax()) for e in range(count))
    worst = 0.0
    for scale in (1.0, 100.0 / max(reach, 1e-12)):
        try:
            want, got = old(x * scale, index, weights), new(x * scale, index, weights)
        except (RuntimeError, ValueError, TypeError, IndexError, AttributeError):  # a reading that cannot run
            return float("inf")
        if not isinstance(want, torch.Tensor) or want.shape != got.shape:
            return float("inf")
        want, got = want.double(), got.double()
        worst = max(worst, float((got - want).norm() / want.norm().clamp_min(torch.finfo(torch.float64).tiny)))
    return worst


def _set(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


@torch.no_grad()
def linearize_(model: nn.Module, layout: ModelLayout | None = None) -> dict:
    """Convert every ``Conv1D``, every foreign ``nn.Linear`` subclass and every block's experts (those the ``layout``
    names; without one, the standard-form experts modules that pass the probe: module docstring) to ``nn.Linear``
    form, in place, function unchanged; return the ``"forms"`` plan section."""
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
                log.warning("%s is a %s, an nn.Linear subclass whose forward is not x Wᵀ + b on a probe input; it "
                            "stays as it is and is no compression target", name, type(module).__name__)
                continue
            _set(model, name, _plain_linear(module.weight, module.bias))
            entry["linear"].append(name)
    if layout is None:
        for name, module in list(model.named_modules()):
            diffs = []
            for form, first in _generic_expert_forms(module):
                new = _linearize_experts(module, first, "down_proj", "act_fn", form)
                diffs.append(_probe_difference(module, new))
                if diffs[-1] <= PROBE_RTOL.get(module.down_proj.dtype, 1e-5):
                    _set(model, name, new)
                    entry["experts"][name] = {"gate_up": first, "down": "down_proj", "act": "act_fn",
                                              **({"form": form} if form != "mixtral" else {})}
                    break
            else:
                if diffs:
                    log.warning("%s (%s) has 3-D expert weights but per-expert linears do not reproduce its output "
                                "(relative difference %s on a random probe); it stays as it is and its matrices are "
                                "not compressed. A model layout (models/layouts) says how this family's experts "
                                "compute", name, type(module).__name__, ", ".join(f"{d:.1e}" for d in diffs))
                elif _experts_interface(module) and not any(p.is_meta for p in module.parameters(recurse=False)):
                    log.warning("%s (%s) holds 3-D expert weights (%s) in a form this package does not read; it stays "
                                "as it is and its matrices are not compressed. A model layout (models/layouts) says "
                                "how this family's experts compute", name, type(module).__name__,
                                ", ".join(n for n, p in module.named_parameters(recurse=False) if p.dim() == 3))
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


__all__ = ["ClampedSwiGLU", "FunctionActivation", "LinearExperts", "apply_forms_plan", "is_linear_map", "linearize_"]
