"""Truncation-aware whitening: SVD-LLM (Cholesky) and SVD-LLM V2 (eigendecomposition).

With calibration tokens ``X (N x n)`` and Gram ``G = XᵀX``, the output error of a rank-r
replacement ``W'`` of ``W (m x n)`` is

    ‖(W - W') Xᵀ‖_F = ‖(W - W') T‖_F        for any T with T Tᵀ = G.

So truncating the SVD of ``W T`` at rank r gives the *optimal* rank-r output error
``sqrt(Σ_{i>r} σ_i(W T)²)`` (Eckart-Young), and ``W' = (W T)_r T⁻¹``.

- ``svd_llm``: ``T = L = chol(G)``.  ``T⁻¹`` is applied with a triangular solve, never an
  explicit inverse.  When G is not positive definite (dead channels, fewer tokens than
  features, float rounding), a jitter ``ε · mean(diag G)`` is added -- relative to the
  matrix scale, starting small and growing tenfold until the factorization succeeds --
  with a warning naming the layer.
- ``svd_llm_v2``: ``G = Q S Qᵀ`` (eigh), ``T = Q_k √S_k`` over the eigenvalues above
  ``eig_rtol · max(S)``; the map back is the pseudo-inverse ``√S_k⁻¹ Q_kᵀ``.  This needs
  no positive definiteness: directions no calibration token visited are simply dropped
  (W' is zero there), which is still optimal for the output-error objective, e.g. when
  there are fewer tokens than features.  When no eigenvalue is below the threshold nothing is
  dropped, and since the truncation is the same for every square root (above), ``root: auto``
  (default) then takes ``T = L`` as ``svd_llm`` does: one Cholesky shows it
  (:func:`margin_cholesky`), 14x cheaper than the eigendecomposition at 576 and 1536 channels.

Both take ``shrinkage`` ``λ ∈ [0, 1)``: the Gram is replaced by its ridge-shrunk version

    G_λ = (1 - λ) G + λ · mean(diag G) · I,

so the truncation minimises ``(1 - λ) ‖(W - W') Xᵀ‖_F² + λ · mean(diag G) · ‖W - W'‖_F²`` -- the
calibration output error plus a weight-space term that keeps the factors from discarding the
directions this calibration sample happened to leave quiet (other kinds of text may use them).
``λ = 0`` is the paper's whitening; ``λ -> 1`` tends to plain SVD.  The mean diagonal makes ``λ``
scale-free (the same ``λ`` means the same thing for every layer).

Dense targets (``svd_llm`` only; ``calibration.dense_targets`` of the sequential mode).  When the
tokens ``X`` reach the layer through already-compressed blocks while the dense model would have fed it
``R`` on the same tokens, the statistics carry ``E = (R - X)ᵀX`` (:mod:`compression.stats`) and the
target becomes the dense model's output:

    min over rank-r W' of  ‖W Rᵀ - W' Xᵀ‖_F²  =  const + ‖W' L - W (G + E) L⁻ᵀ‖_F²     (L Lᵀ = G),

so the truncated SVD is taken of ``M = W L + W E L⁻ᵀ`` and mapped back by ``L⁻¹`` as before
(``E = 0``: exactly SVD-LLM).  With shrinkage ``λ`` (and any jitter) the weight-space term
``‖W - W'‖_F²`` joins the objective with the same weight as in the Gram, which makes it
``M = W L + (1 - λ) W E L⁻ᵀ`` with ``L`` the Cholesky factor of the shrunk (jittered) Gram.  At full
rank the optimum is ``M L⁻¹ = W + (1 - λ) W E L⁻ᵀ L⁻¹`` (:meth:`SVDLLM.corrected`; for ``λ = 0`` and no
jitter the least squares ``W (G + E) G⁻¹``), which ``calibration.correct_dense`` gives the matrices kept dense.

Either way, with ``N < n`` calibration tokens the Gram has rank ``<= N`` and the factors are
fitted to the directions that sample happened to visit: :meth:`Method.check_stats` warns once
per layer with the numbers (layer, ``N``, ``n``) for both methods, since the remedy -- more
calibration tokens -- is the same.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from compression.methods import Method, MethodConfig, register

log = logging.getLogger(__name__)


@dataclass
class SVDLLMConfig(MethodConfig):
    """SVD-LLM whitening.

    ``jitter``: first relative shift ``ε`` tried when the Gram is not positive definite
    (added as ``ε · mean(diag G) · I``); multiplied by 10 per retry up to ``max_jitter``.

    ``shrinkage``: ridge weight ``λ`` of the Gram, ``G -> (1 - λ) G + λ · mean(diag G) · I``
    (module docstring); 0 is the paper's whitening.
    """

    jitter: float = 1e-8
    max_jitter: float = 1e-1
    shrinkage: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.jitter <= self.max_jitter:
            raise ValueError(f"need 0 < jitter <= max_jitter, got {self.jitter} and {self.max_jitter}")
        _check_shrinkage(self.shrinkage)


def _check_shrinkage(value: float) -> None:
    if not (isinstance(value, int | float) and 0.0 <= value < 1.0):
        raise ValueError(f"shrinkage is the ridge weight λ in [0, 1) of G -> (1-λ) G + λ mean(diag G) I "
                         f"(0: plain whitening), got {value!r}")


def shrink_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - λ) G + λ · mean(diag G) · I`` (a new tensor when ``λ > 0``; ``G`` itself when ``λ = 0``)."""
    if shrinkage == 0.0:
        return gram
    out = gram * (1.0 - shrinkage)
    out.diagonal().add_(shrinkage * float(gram.diagonal().mean()))
    return out


def _whitening(stats, weight: torch.Tensor, name: str, key: tuple, compute):
    """``compute(gram)`` of the layer's Gram, computed once for the layers sharing the input stream during a
    pass (:func:`compression.stats.shared_reads`); the Gram's shape is checked for every layer."""
    if stats.gram.shape != (weight.shape[1], weight.shape[1]):
        raise ValueError(f"Gram of layer {name!r} is {tuple(stats.gram.shape)}, weight has {weight.shape[1]} inputs")
    return stats.derived((*key, weight.device), lambda: compute(stats.gram.to(weight.device, torch.float64)))


def _scaled(gram: torch.Tensor, name: str, shrinkage: float) -> torch.Tensor:
    """The Gram shrunk by ``shrinkage``; refused when every activation was zero."""
    scale = float(gram.diagonal().mean())
    if scale <= 0.0:
        raise ValueError(f"layer {name!r}: every calibration activation was zero; cannot whiten")
    return shrink_gram(gram, shrinkage)


def cholesky_with_jitter(gram: torch.Tensor, name: str, jitter: float, max_jitter: float) -> torch.Tensor:
    """Lower ``L`` with ``L Lᵀ = G (+ ε·mean(diag G)·I)``; warns naming the layer when ε was needed."""
    chol, info = torch.linalg.cholesky_ex(gram)
    if int(info) == 0:
        return chol
    scale = float(gram.diagonal().mean())
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    eps = jitter
    while eps <= max_jitter * (1 + 1e-12):
        chol, info = torch.linalg.cholesky_ex(gram + (eps * scale) * eye)
        if int(info) == 0:
            log.warning(
                "layer %r: Gram matrix not positive definite; added jitter %.1e x mean(diag) = %.3e (for every "
                "layer reading the same input). More (or more varied) calibration tokens avoid this; svd_llm_v2 "
                "needs no jitter.",
                name, eps, eps * scale,
            )
            return chol
        eps *= 10.0
    raise torch.linalg.LinAlgError(
        f"layer {name!r}: Cholesky of the Gram matrix failed even with jitter {max_jitter:g} x mean(diag); "
        "use method 'svd_llm_v2' (eigendecomposition, no positive definiteness needed)"
    )


@register
class SVDLLM(Method):
    name = "svd_llm"
    config_type = SVDLLMConfig
    needs = frozenset({"gram"})
    dense_targets = True

    def _chol(self, weight, stats, name):
        cfg: SVDLLMConfig = self.config  # type: ignore[assignment]
        return _whitening(stats, weight, name, ("cholesky", cfg.shrinkage, cfg.jitter, cfg.max_jitter),
                          lambda gram: cholesky_with_jitter(_scaled(gram, name, cfg.shrinkage), name, cfg.jitter,
                                                            cfg.max_jitter))

    def _target_shift(self, weight, stats, chol):
        """``(1 - λ) W E L⁻ᵀ`` (module docstring); exactly zero when ``E`` is."""
        shift = weight @ stats.cross.to(weight.device, torch.float64)
        return (1.0 - self.config.shrinkage) * torch.linalg.solve_triangular(chol.T, shift, upper=True, left=False)

    def transformed(self, weight, stats, name):
        chol = self._chol(weight, stats, name)
        mat = weight @ chol
        if stats.cross is not None:  # dense targets (module docstring): + (1 - λ) W E L⁻ᵀ
            mat += self._target_shift(weight, stats, chol)
        return mat, chol

    @torch.no_grad()
    def corrected(self, weight, stats, name):
        """The full-rank dense-target optimum ``W + (1 - λ) W E L⁻ᵀ L⁻¹`` (least squares ``W C G⁻¹`` for
        ``λ = 0`` without jitter): the same parameters as ``W`` (``calibration.correct_dense``)."""
        self.check_stats(stats, name)
        if stats.cross is None:
            raise ValueError(f"layer {name!r}: the dense-target correction needs statistics with a cross Gram")
        weight = weight.detach().double()
        chol = self._chol(weight, stats, name)
        return weight + self.unmap(self._target_shift(weight, stats, chol), chol)

    def unmap(self, right, ctx):
        # right · L⁻¹ via a triangular solve of X L = right
        return torch.linalg.solve_triangular(ctx, right, upper=False, left=False)


V2_ROOTS = ("auto", "eigh")
"""How ``svd_llm_v2`` takes the Gram's square root (:class:`SVDLLMV2Config`)."""


@dataclass
class SVDLLMV2Config(MethodConfig):
    """SVD-LLM V2 loss-optimized truncation.

    ``eig_rtol``: eigenvalues of the Gram below ``eig_rtol · max`` are treated as zero
    (directions the calibration data never visited).
    ``shrinkage``: ridge weight of the Gram, as for ``svd_llm``.
    ``root``: ``"auto"`` (default) takes the Cholesky factor when :func:`margin_cholesky` shows that no eigenvalue
    is below ``eig_rtol · max`` -- nothing to drop, and any square root gives the same factors -- and the
    eigendecomposition otherwise; ``"eigh"`` always takes the eigendecomposition.
    """

    eig_rtol: float = 1e-10
    shrinkage: float = 0.0
    root: str = "auto"

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0.0 < self.eig_rtol < 1.0:
            raise ValueError(f"eig_rtol must lie in (0, 1), got {self.eig_rtol}")
        _check_shrinkage(self.shrinkage)
        if self.root not in V2_ROOTS:
            raise ValueError(f"svd_llm_v2 root must be one of {V2_ROOTS}, got {self.root!r}")


def margin_cholesky(gram: torch.Tensor, rtol: float) -> torch.Tensor | None:
    """Lower ``L`` with ``L Lᵀ = G`` when every eigenvalue of ``G`` exceeds ``rtol · λ_max``, else ``None``; no
    eigenvalue is computed.

    ``τ = rtol · ‖G‖_∞`` (largest absolute row sum) is at least ``rtol · λ_max``, and ``G - τ I`` has a Cholesky
    factor only when ``λ_min(G) > τ``, up to the factorization's backward error of order ``n ε ‖G‖`` (3e-13 ‖G‖
    for ``n = 1536``; the eigendecomposition's own eigenvalues carry an error of order ``ε ‖G‖``).  When it does,
    ``G`` is factored itself.  A "no" costs one Cholesky: ``τ`` overestimates ``rtol · λ_max`` by at most
    ``sqrt(n)``, so a Gram with its smallest eigenvalue just above the threshold takes the eigendecomposition
    (which then drops nothing).  On 2 CPU cores in float64 a Cholesky took 1.7 ms at 576 and 28 ms at 1536 channels,
    the eigendecomposition 24 and 381 ms."""
    tau = rtol * float(gram.abs().sum(1).max())
    shifted = gram.clone()
    shifted.diagonal().sub_(tau)
    _, info = torch.linalg.cholesky_ex(shifted)
    del shifted
    if int(info) != 0:
        return None
    chol, info = torch.linalg.cholesky_ex(gram)
    return chol if int(info) == 0 else None


def _v2_root(gram: torch.Tensor, cfg: SVDLLMV2Config) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """A Cholesky factor (``root: auto`` and nothing to drop) or the eigendecomposition ``(evals, evecs)``."""
    chol = margin_cholesky(gram, cfg.eig_rtol) if cfg.root == "auto" else None
    return chol if chol is not None else torch.linalg.eigh(gram)


@register
class SVDLLMV2(Method):
    name = "svd_llm_v2"
    config_type = SVDLLMV2Config
    needs = frozenset({"gram"})

    def transformed(self, weight, stats, name):
        cfg: SVDLLMV2Config = self.config  # type: ignore[assignment]
        root = _whitening(stats, weight, name, ("v2", cfg.root, cfg.eig_rtol, cfg.shrinkage),
                          lambda gram: _v2_root(_scaled(gram, name, cfg.shrinkage), cfg))
        if isinstance(root, torch.Tensor):  # T = L: every eigenvalue above the threshold, nothing dropped
            return weight @ root, root
        evals, evecs = root
        keep = evals > cfg.eig_rtol * float(evals.max())
        dropped = int((~keep).sum())
        if dropped:
            log.info("layer %r: %d of %d Gram directions unseen in calibration are dropped", name, dropped,
                     evals.numel())
            evecs, evals = evecs[:, keep], evals[keep]
        root = evals.sqrt()
        return (weight @ evecs) * root, (evecs, root)

    def unmap(self, right, ctx):
        if isinstance(ctx, torch.Tensor):  # right · L⁻¹, as svd_llm
            return torch.linalg.solve_triangular(ctx, right, upper=False, left=False)
        q, root = ctx
        return (right / root) @ q.T
