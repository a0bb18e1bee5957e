"""Output-side Fisher weighting of the truncation (FWSVD's row weights on top of SVD-LLM's whitening).

The whitened truncation (:mod:`compression.whitening`) minimises a layer's *output* error
``‖(W - W') Xᵀ‖_F``, counting every output channel alike.  The model's loss does not: to second order
(the Kronecker-factored Fisher of a linear layer, ``F ≈ E[g gᵀ] ⊗ E[x xᵀ]`` with ``g = ∂L/∂y`` the
gradient at the layer's output) dropping ``ΔW`` costs

    ΔL ≈ ½ tr(ΔWᵀ F_out ΔW G),     F_out = Σ_t g_t g_tᵀ,   G = Σ_t x_t x_tᵀ,

and with a diagonal ``F_out = diag(f)`` (Hsu et al., *Language model compression with weighted low-rank
factorization*, ICLR 2022: FWSVD's row weights) that is ``‖D (W - W') L‖_F²`` with ``D = diag(√f)``,
``L Lᵀ = G``.  Its rank-r optimum is again a truncated SVD (Eckart-Young), of ``D W L``:

    D W L = U Σ Vᵀ,    W' = D⁻¹ U_r Σ_r V_rᵀ L⁻¹,    up = D⁻¹ U_r Σ_r^(1-β),  down = Σ_r^β V_rᵀ L⁻¹.

``f`` is summed over the calibration tokens of a few backward passes through the dense model
(:func:`output_fisher`).  It is estimated from few tokens and spans orders of magnitude, so it is damped
towards uniform weights, scale-free:

    d_j² = (1 - λ) f_j / mean(f) + λ,        λ = ``damping`` ∈ (0, 1]

(``λ = 1``: every ``d_j = 1``, exactly the unweighted method; the mean normalisation keeps the
transformed spectrum on the unweighted scale, which spectrum-based allocations compare across layers).
Multiplied back, ``f̄ σ_i²`` (``f̄ = mean(f)``, :attr:`OutputWeighted.scales`) is ``tr(ΔWᵀ F_λ ΔW G)`` of
dropping triplet ``i``, ``F_λ = f̄ D²`` the damped output Fisher: what allocation ``kfac`` ranks by.

``full`` (``calibration.output_fisher_full``): the whole ``F_out = Σ_t g_t g_tᵀ`` instead of its diagonal,
damped the same way, ``F_λ = (1 - λ) F_out / mean(diag F_out) + λ I = R Rᵀ`` (Cholesky); the loss term is
``‖Rᵀ ΔW L‖_F²`` and the truncation that of ``Rᵀ W L``, mapped back by ``R⁻ᵀ`` (a triangular solve) -- the
Kronecker-factored form of GFWSVD (Chekalina et al., 2025), its input factor taken from the activations.
It costs an ``out x out`` float64 sum per layer (joint groups: block-diagonal over their members).
:class:`OutputWeighted` wraps any :class:`compression.methods.Method`: its right transform (``L``, an
ASVD scaling, ``I``) is the wrapped method's, the left one is ``D``; ``Method.unmap_left`` applies
``D⁻¹`` to the up factor, and the gradient importance maps its bases the same way.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from compression.finite import all_finite
from compression.gradient_allocation import targeted_backwards
from compression.methods import Method
from compression.stats import ieee_float32_matmul

log = logging.getLogger(__name__)


def output_fisher(model: nn.Module, layer_names: Sequence[str], batches: Iterable,
                  loss_fn: Callable[[nn.Module, object], torch.Tensor],
                  full: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """``(name -> Σ_t g_t² (out_features,) float64 CPU, batches)``: the squared loss gradient at each named
    ``nn.Linear``'s output, summed over every token of ``batches`` (one backward each).  ``full``: the whole
    ``Σ_t g_t g_tᵀ`` (out x out; a float32 GEMM per batch, float64 for float64 models, into a float64 sum).

    Sums, so processes combine them by adding (then divide nothing: only the shape of ``f`` matters).
    The model's ``requires_grad`` flags are restored and gradients cleared afterwards.
    """
    modules = {n: model.get_submodule(n) for n in layer_names}
    for n, mod in modules.items():
        if not isinstance(mod, nn.Linear):
            raise TypeError(f"output_fisher: {n!r} is a {type(mod).__name__}; run it before compression")
    sums = {n: torch.zeros((mod.out_features,) * (2 if full else 1), dtype=torch.float64, device=mod.weight.device)
            for n, mod in modules.items()}

    def hook(name: str):
        def accumulate(grad: torch.Tensor) -> None:
            g = grad.detach().reshape(-1, grad.shape[-1])
            if full:
                g = g if g.dtype == torch.float64 else g.float()
                with ieee_float32_matmul():  # no TF32 / bfloat16 rounding where the process allows it
                    sums[name].add_(g.T @ g)
            else:
                sums[name].add_(g.double().square().sum(0))

        def forward_hook(_mod, _inp, out):
            if out.requires_grad:
                out.register_hook(accumulate)
        return forward_hook

    handles = [mod.register_forward_hook(hook(n)) for n, mod in modules.items()]
    count = 0
    try:  # the targeted weights need gradients: then the graph reaches every targeted output
        for _ in targeted_backwards(model, modules.values(), batches, loss_fn):
            count += 1
    finally:
        for h in handles:
            h.remove()
    if count == 0:
        raise ValueError("output_fisher: no calibration batches")
    for n, f in sums.items():
        if not all_finite(f):
            raise FloatingPointError(f"output_fisher: non-finite output gradients at layer {n!r}")
    log.info("output Fisher of %d layers from %d batches", len(sums), count)
    return {n: f.cpu() for n, f in sums.items()}, count


def row_weights(fisher: torch.Tensor, damping: float, name: str) -> torch.Tensor:
    """``d`` with ``d_j² = (1 - λ) f_j / mean(f) + λ`` (module docstring), float64; for a full ``F`` (out x
    out) the lower Cholesky factor ``R`` of ``(1 - λ) F / mean(diag F) + λ I`` (``R Rᵀ``, positive definite
    for ``λ > 0``), whose ``Rᵀ`` is the left transform."""
    if not 0.0 < damping <= 1.0:
        raise ValueError(f"output Fisher damping λ must lie in (0, 1] (1: unweighted), got {damping!r}")
    f = fisher.double()
    diag = f if f.dim() == 1 else f.diagonal()
    mean = float(diag.mean())
    if not (mean > 0.0 and all_finite(f) and bool((diag >= 0).all())):
        raise ValueError(f"layer {name!r}: its output Fisher is zero, negative or non-finite; did the "
                         "calibration loss reach it?")
    if f.dim() == 1:
        return ((1.0 - damping) * f / mean + damping).sqrt()
    shrunk = (1.0 - damping) / mean * (f + f.T) / 2
    shrunk.diagonal().add_(damping)
    return torch.linalg.cholesky(shrunk)


class OutputWeighted(Method):
    """``inner``'s truncation with the output rows weighted by ``D`` (module docstring).

    ``fisher[key]``: the summed squared output gradient of every matrix key the method will see (joint
    groups: their members' vectors stacked in member order).  A key without one is an error, never an
    unweighted truncation.
    """

    def __init__(self, inner: Method, fisher: Mapping[str, torch.Tensor], damping: float) -> None:
        if isinstance(inner, OutputWeighted):
            raise ValueError("the method is already output-weighted")
        self.inner, self.config, self.damping = inner, inner.config, float(damping)
        self.name, self.config_type, self.needs = inner.name, inner.config_type, inner.needs
        self.dense_targets = inner.dense_targets
        self.weights = {k: row_weights(f, self.damping, k) for k, f in fisher.items()}
        # mean of each output Fisher's diagonal: the scale row_weights divides out, so that f̄ σ² of the weighted
        # spectrum is the Kronecker-factored loss of dropping a triplet (allocation ``kfac``)
        self.scales = {k: float((f if f.dim() == 1 else f.diagonal()).double().mean()) for k, f in fisher.items()}

    def _rows(self, weight: torch.Tensor, name: str) -> torch.Tensor:
        if name not in self.weights:
            raise KeyError(f"output Fisher weighting: no output Fisher for matrix {name!r}; it was collected for "
                           f"{len(self.weights)} matrices (e.g. {sorted(self.weights)[:3]})")
        d = self.weights[name]
        if d.shape[0] != weight.shape[0]:
            raise ValueError(f"matrix {name!r} has {weight.shape[0]} outputs, its output Fisher {d.shape[0]}")
        return d.to(weight.device, torch.float64)

    def check_stats(self, stats, name):
        self.inner.check_stats(stats, name)

    def transformed(self, weight, stats, name):
        mat, ctx = self.inner.transformed(weight, stats, name)
        d = self._rows(weight, name)
        return (d[:, None] * mat if d.dim() == 1 else d.T @ mat), (ctx, d)

    def unmap(self, right, ctx):
        return self.inner.unmap(right, ctx[0])

    def unmap_left(self, left, ctx):
        d = ctx[1]
        left = left / d[:, None] if d.dim() == 1 else torch.linalg.solve_triangular(d.T, left, upper=True)
        return self.inner.unmap_left(left, ctx[0])

    def corrected(self, weight, stats, name):  # full rank: the row weights change nothing
        return self.inner.corrected(weight, stats, name)
