"""Fake quantization: weights (RTN or GPTQ) and per-token activations, for dense and low-rank layers.

A ``b``-bit uniform quantizer with scale ``s`` (and zero point ``z`` when asymmetric) maps

    symmetric:   q = clamp(round(w / s), -2^(b-1), 2^(b-1) - 1),   ŵ = s q,       s = c · max|w| / (2^(b-1) - 1)
    asymmetric:  q = clamp(round(w / s) + z, 0, 2^b - 1),           ŵ = s (q - z),  s = c (max w - min w) / (2^b - 1)

over one *row* of the weight (per output channel) or one group of ``group_size`` inputs of a
row.  ``c ∈ [1 - max_shrink, 1]`` is the clipping factor: with ``clip=True`` it is searched per
row on a grid of ``grid`` steps (shrink factors down to 0.2 by default) minimizing
``Σ |ŵ - w|^norm`` with ``norm = 2.4`` (the QuaRot/GPTQ choice: between MSE and max error).

GPTQ quantizes the columns of ``W (m x n)`` one at a time and spreads each column's rounding
error over the not-yet-quantized columns with the inverse Hessian ``H = 2 XᵀX`` (the input Gram
of the layer), minimizing ``‖(W - Ŵ) Xᵀ‖_F`` greedily; scales come from the clip search above.

Activations are quantized per token (each row of ``x [..., n]``, or each group of it), symmetric
by default, with a fixed clip ratio (0.9 in QSVD) instead of a search.  The rounding uses a
straight-through estimator so a fake-quantized model still back-propagates.

Weights are stored *dequantized* in the ordinary float ``weight`` parameter (this is
simulation, no integer kernels); :class:`QuantLinear` adds the input quantizer and records
both configs, so a plan can rebuild the structure and a state dict loads into it.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)


@dataclass
class WeightQuantConfig:
    """Weight quantizer.  ``group_size=None``: one scale per output row.  ``method``: ``"rtn"`` or ``"gptq"``."""

    bits: int = 4
    symmetric: bool = True
    group_size: int | None = None
    clip: bool = True
    max_shrink: float = 0.8
    grid: int = 100
    norm: float = 2.4
    method: str = "rtn"
    gptq_damp: float = 0.01
    gptq_block: int = 128

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"weight bits must lie in [2, 16], got {self.bits}")
        if self.method not in ("rtn", "gptq"):
            raise ValueError(f"weight quantization method must be 'rtn' or 'gptq', got {self.method!r}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must lie in [0, 1), got {self.max_shrink}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"group_size must be >= 1 or None, got {self.group_size}")


@dataclass
class ActQuantConfig:
    """Per-token activation quantizer with a fixed ``clip_ratio`` of the token's range."""

    bits: int = 8
    symmetric: bool = True
    clip_ratio: float = 1.0
    group_size: int | None = None

    def __post_init__(self) -> None:
        if not 2 <= self.bits <= 16:
            raise ValueError(f"activation bits must lie in [2, 16], got {self.bits}")
        if not 0.0 < self.clip_ratio <= 1.0:
            raise ValueError(f"clip_ratio must lie in (0, 1], got {self.clip_ratio}")


def _quantize(x: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor | None, bits: int) -> torch.Tensor:
    """Round-trip ``x`` through the grid given by ``scale`` (and ``zero``); shapes broadcast."""
    if zero is None:
        qmax = 2 ** (bits - 1) - 1
        return torch.div(x, scale).round_().clamp_(-qmax - 1, qmax).mul_(scale)
    return torch.div(x, scale).round_().add_(zero).clamp_(0, 2**bits - 1).sub_(zero).mul_(scale)


def _grid(rows: torch.Tensor, bits: int, symmetric: bool, shrink: float | torch.Tensor):
    """Scale (and zero) per row of ``rows (k x g)`` at clip factor ``shrink``."""
    tiny = torch.finfo(rows.dtype).tiny
    if symmetric:
        scale = (rows.abs().amax(1, keepdim=True) * shrink / (2 ** (bits - 1) - 1)).clamp_min(tiny)
        return scale, None
    hi = (rows.amax(1, keepdim=True).clamp_min(0) * shrink)
    lo = (rows.amin(1, keepdim=True).clamp_max(0) * shrink)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(tiny)
    return scale, torch.round(-lo / scale)


@torch.no_grad()
def find_params(rows: torch.Tensor, cfg: WeightQuantConfig) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-row ``(scale, zero)`` of ``rows (k x g)``; with ``cfg.clip`` the clip factor minimizing ``Σ|ŵ-w|^norm``."""
    scale, zero = _grid(rows, cfg.bits, cfg.symmetric, 1.0)
    if not cfg.clip:
        return scale, zero
    best = torch.full((rows.shape[0], 1), float("inf"), dtype=rows.dtype, device=rows.device)
    base_scale, base_zero = scale, zero
    for i in range(int(cfg.max_shrink * cfg.grid) + 1):
        p = 1.0 - i / cfg.grid
        if cfg.symmetric:  # scale is linear in the clip factor: no need to redo the row maxima
            s, z = base_scale * p, None
        else:
            s, z = _grid(rows, cfg.bits, False, p)
        err = _quantize(rows, s, z, cfg.bits).sub_(rows).abs_().pow_(cfg.norm).sum(1, keepdim=True)
        better = err < best
        best = torch.where(better, err, best)
        scale = torch.where(better, s, scale)
        if z is not None:
            zero = torch.where(better, z, zero)
    del base_zero
    return scale, zero


def _grouped(w: torch.Tensor, group: int | None) -> tuple[torch.Tensor, int]:
    m, n = w.shape
    g = n if group is None else group
    if n % g:
        raise ValueError(f"group_size {g} does not divide the {n} input channels")
    return w.reshape(m * (n // g), g), g


@torch.no_grad()
def quantize_weight_rtn(w: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    """Round-to-nearest fake quantization of ``w (m x n)``; returns ``ŵ`` with ``w``'s shape and dtype."""
    rows, _ = _grouped(w.detach().float(), cfg.group_size)
    scale, zero = find_params(rows, cfg)
    return _quantize(rows, scale, zero, cfg.bits).reshape(w.shape).to(w.dtype)


@torch.no_grad()
def quantize_weight_gptq(w: torch.Tensor, gram: torch.Tensor, cfg: WeightQuantConfig) -> torch.Tensor:
    """GPTQ fake quantization of ``w (m x n)`` given the input Gram ``XᵀX (n x n)`` (see module docstring)."""
    m, n = w.shape
    if gram.shape != (n, n):
        raise ValueError(f"GPTQ Gram is {tuple(gram.shape)}, weight has {n} inputs")
    wq = w.detach().double().clone()
    h = gram.to(wq.device, torch.float64).clone()
    dead = torch.diagonal(h) == 0
    h[dead, dead] = 1.0
    wq[:, dead] = 0.0
    h += cfg.gptq_damp * float(torch.diagonal(h).mean()) * torch.eye(n, dtype=h.dtype, device=h.device)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)
    g = n if cfg.group_size is None else cfg.group_size
    if n % g:
        raise ValueError(f"group_size {g} does not divide the {n} input channels")
    out = torch.zeros_like(wq)
    scale = zero = None
    for i1 in range(0, n, cfg.gptq_block):
        i2 = min(i1 + cfg.gptq_block, n)
        w1, err1, hinv1 = wq[:, i1:i2].clone(), torch.zeros(m, i2 - i1, dtype=wq.dtype), hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % g == 0:  # scales of the next group from the (error-updated) weights
                block = torch.cat([w1[:, i:], wq[:, i2:]], 1)[:, :g]
                scale, zero = find_params(block.float(), cfg)
                scale, zero = scale.double(), None if zero is None else zero.double()
            q = _quantize(w1[:, i:i + 1], scale, zero, cfg.bits)[:, 0]
            out[:, col] = q
            e = (w1[:, i] - q) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        wq[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return out.to(w.dtype)


def quantize_activation(x: torch.Tensor, cfg: ActQuantConfig) -> torch.Tensor:
    """Per-token fake quantization of ``x [..., n]`` (straight-through gradient)."""
    n = x.shape[-1]
    g = n if cfg.group_size is None else cfg.group_size
    if n % g:
        raise ValueError(f"activation group_size {g} does not divide {n} channels")
    rows = x.reshape(-1, g)
    scale, zero = _grid(rows.detach(), cfg.bits, cfg.symmetric, cfg.clip_ratio)
    q = _quantize(rows, scale, zero, cfg.bits).reshape(x.shape)
    return x + (q - x).detach()


class QuantLinear(nn.Linear):
    """``y = ŵ · Q_a(x) + b``: fake-quantized weight (stored dequantized) and per-token input quantizer.

    Shapes as ``nn.Linear``: ``[..., in] -> [..., out]``.  ``act=None`` leaves the input in float;
    ``weight_config`` only records how ``weight`` was quantized (for the plan and ``repr``).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 weight_config: WeightQuantConfig | None = None, act: ActQuantConfig | None = None,
                 device=None, dtype=None) -> None:
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.weight_config = weight_config
        self.act = act

    @classmethod
    @torch.no_grad()
    def from_linear(cls, linear: nn.Linear, weight_config: WeightQuantConfig | None,
                    act: ActQuantConfig | None, gram: torch.Tensor | None = None) -> QuantLinear:
        """Quantize ``linear``'s weight (RTN, or GPTQ when configured and ``gram`` given) and wrap it."""
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weight_config, act,
                    device=w.device, dtype=w.dtype)
        if weight_config is None:
            layer.weight.copy_(w)
        elif weight_config.method == "gptq":
            if gram is None:
                raise ValueError("GPTQ needs the layer's input Gram; collect statistics on this layer first")
            layer.weight.copy_(quantize_weight_gptq(w, gram, weight_config))
        else:
            layer.weight.copy_(quantize_weight_rtn(w, weight_config))
        if linear.bias is not None:
            layer.bias.copy_(linear.bias)
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.act is not None:
            x = quantize_activation(x, self.act)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        w = "float" if self.weight_config is None else f"W{self.weight_config.bits}-{self.weight_config.method}"
        a = "float" if self.act is None else f"A{self.act.bits}"
        return f"{super().extra_repr()}, {w}, {a}"


def output_head_names(model: nn.Module) -> list[str]:
    """The module name of ``model.get_output_embeddings()`` (a ``transformers`` model's head), if any."""
    getter = getattr(model, "get_output_embeddings", None)
    head = getter() if callable(getter) else None
    return [n for n, m in model.named_modules() if head is not None and m is head]


def quantizable_linears(model: nn.Module, exclude: Iterable[str] | None = None) -> list[str]:
    """Names of every plain ``nn.Linear`` or joint factor (including low-rank factors) not matching ``exclude``
    (default: the output head, whose error hits every token's logits directly)."""
    from compression.joint import FactorLinear
    from compression.targets import name_matches

    exclude = output_head_names(model) if exclude is None else list(exclude)
    return [n for n, m in model.named_modules()
            if type(m) in (nn.Linear, FactorLinear) and not any(name_matches(n, p) for p in exclude)]


@torch.no_grad()
def quantize_model_(
    model: nn.Module,
    weight: WeightQuantConfig | None,
    act: ActQuantConfig | None,
    exclude: Iterable[str] | None = None,
    grams: Mapping[str, torch.Tensor] | Callable[[str], torch.Tensor | None] | None = None,
) -> dict:
    """Replace every plain ``nn.Linear`` (dense or a low-rank factor) by a :class:`QuantLinear`, in place.

    ``exclude``: name patterns left in float (default: the output head).  3-D expert tensors are not
    ``nn.Linear`` and stay in float unless linearized (:func:`compression.forms.linearize_`).
    ``grams`` (name -> input Gram, or a function of the name) is needed for GPTQ.  Returns the
    plan entry ``{"weight": ..., "act": ..., "layers": [...]}`` for :func:`apply_quant_plan`.
    """
    from compression.plan import set_submodule

    names = quantizable_linears(model, exclude)
    if not names:
        raise ValueError("quantize_model_: no nn.Linear left to quantize")
    for name in names:
        gram = grams(name) if callable(grams) else (grams or {}).get(name)
        set_submodule(model, name, QuantLinear.from_linear(model.get_submodule(name), weight, act, gram))
    log.info("fake-quantized %d linear layers (%s, %s)", len(names), weight, act)
    return quant_plan_entry(weight, act, names)


def quant_plan_entry(weight: WeightQuantConfig | None, act: ActQuantConfig | None, names: list[str]) -> dict:
    return {"weight": None if weight is None else dataclasses.asdict(weight),
            "act": None if act is None else dataclasses.asdict(act), "layers": list(names)}


def apply_quant_plan(model: nn.Module, entry: Mapping) -> list[str]:
    """Rebuild the :class:`QuantLinear` structure recorded by :func:`quantize_model_` (load weights after)."""
    from compression.joint import FactorLinear
    from compression.plan import set_submodule

    weight = None if entry.get("weight") is None else WeightQuantConfig(**entry["weight"])
    act = None if entry.get("act") is None else ActQuantConfig(**entry["act"])
    changed = []
    for name in entry["layers"]:
        module = model.get_submodule(name)
        if isinstance(module, QuantLinear):
            continue
        if type(module) not in (nn.Linear, FactorLinear):
            raise ValueError(f"quantization plan names {name!r}, a {type(module).__name__}, expected nn.Linear")
        new = QuantLinear(module.in_features, module.out_features, module.bias is not None, weight, act,
                          device=module.weight.device, dtype=module.weight.dtype)
        set_submodule(model, name, new)
        changed.append(name)
    return changed
