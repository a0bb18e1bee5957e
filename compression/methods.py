"""Decomposition methods: one config dataclass and one registered handler each.

Every method factorizes a weight ``W (m x n)`` in some transformed space

    W T = U Σ Vᵀ      (T an invertible n x n transform chosen from calibration statistics)

keeps the top ``r`` singular triplets and maps back:

    W' = U_r Σ_r V_rᵀ T⁻¹,   up = U_r Σ_r^(1-β),   down = Σ_r^β V_rᵀ T⁻¹        (β = 0.5 by default)

The singular values of ``W T`` measure the loss the method optimises; the theoretical
truncation loss at rank ``r`` is ``sqrt(Σ_{i>r} σ_i²)``:

- ``svd``: ``T = I``; loss = ``‖W - W'‖_F``.
- ``asvd``: ``T = diag(s)``, ``s_j = (mean_t |x_tj|)^α`` (or max); loss in the scaled space.
- ``svd_llm`` / ``svd_llm_v2`` (:mod:`compression.whitening`): ``T T ᵀ = XᵀX``; the loss is
  exactly the output error ``‖(W - W') Xᵀ‖_F`` on the calibration tokens.

A handler has two steps so that rank allocation can look at every layer's spectrum
before any layer is cut: :meth:`Method.spectrum` (singular values only) and
:meth:`Method.decompose` (factors at a given rank).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch

from compression.finite import all_finite
from compression.stats import ChannelStats

log = logging.getLogger(__name__)

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a method available under ``cls.name``."""
    if cls.name in METHODS:
        raise ValueError(f"method {cls.name!r} registered twice")
    METHODS[cls.name] = cls
    return cls


@dataclass
class Factors:
    """``up (m x r)``, ``down (r x n)`` in float64, and the truncation loss in the method's space."""

    up: torch.Tensor
    down: torch.Tensor
    truncation_loss: float
    total_energy: float  # ‖W T‖_F², so truncation_loss² / total_energy is the dropped fraction

    @property
    def relative_loss(self) -> float:
        return (self.truncation_loss**2 / self.total_energy) ** 0.5 if self.total_energy > 0 else 0.0


SOLVERS = ("gram_eigh", "svd")
"""How the transformed weight's singular triplets are computed (:func:`thin_svd`)."""


def missing_stats_error(method: str, missing: list[str]) -> str:
    """The error for targeted layers without calibration statistics, naming every one of them and the ``exclude``
    list that leaves them dense."""
    experts = sum(".experts." in n for n in missing)
    shown = ", ".join(missing[:6]) + (f", ... ({len(missing) - 6} more)" if len(missing) > 6 else "")
    why = (f" ({experts} of them mixture-of-experts experts, which a router may never choose on the calibration "
           "batches)" if experts else "")
    return (f"method {method!r} needs calibration statistics for every targeted layer and has none for {len(missing)} "
            f"of them{why}: {shown}. Statistics collected for these targets (collect_stats with the same layer names) "
            "miss only the layers the calibration forwards never call (an expert not chosen, a branch these batches do "
            "not take): calibrate on more or more varied tokens, or leave them out of the targets: exclude: "
            f"{json.dumps(missing)}")


@dataclass
class MethodConfig:
    """Base of the per-method configs.  ``beta`` splits Σ: down gets Σ^β, up gets Σ^(1-β).

    ``solver``: ``"gram_eigh"`` (default), the eigendecomposition of the smaller Gram side of the transformed
    weight, or ``"svd"``, LAPACK's / cuSOLVER's SVD of the weight itself (:func:`thin_svd`)."""

    beta: float = 0.5
    solver: str = "gram_eigh"

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta <= 1.0:
            raise ValueError(f"beta must lie in [0, 1], got {self.beta}")
        if self.solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {self.solver!r}")

    def to_dict(self) -> dict:
        return {"name": self.method_name(), **dataclasses.asdict(self)}

    @classmethod
    def method_name(cls) -> str:
        for name, method in METHODS.items():
            if method.config_type is cls:
                return name
        raise KeyError(f"{cls.__name__} is not registered")


class Method:
    """A registered decomposition; subclasses set ``name``, ``config_type`` and ``transform``."""

    name: ClassVar[str]
    config_type: ClassVar[type[MethodConfig]]
    needs: ClassVar[frozenset[str]] = frozenset()  # statistics fields: {"gram"} / {"abs"} / {}
    dense_targets: ClassVar[bool] = False  # fits W' X_c to W X_d when the statistics carry a cross Gram

    def __init__(self, config: MethodConfig) -> None:
        if not isinstance(config, self.config_type):
            raise TypeError(f"method {self.name!r} takes {self.config_type.__name__}, got {type(config).__name__}")
        self.config = config

    # -- to implement -----------------------------------------------------------------------------
    def transformed(self, weight: torch.Tensor, stats: ChannelStats | None, name: str) -> tuple[torch.Tensor, object]:
        """``(W T, ctx)``: the matrix whose SVD is truncated and whatever ``unmap`` needs."""
        raise NotImplementedError

    def unmap(self, right: torch.Tensor, ctx: object) -> torch.Tensor:
        """``right (r x n)`` in the transformed space -> ``right T⁻¹``."""
        raise NotImplementedError

    def unmap_left(self, left: torch.Tensor, ctx: object) -> torch.Tensor:
        """``left (m x r)`` in the transformed space -> the weight's output space: the identity unless a
        left transform is used (:class:`compression.output_fisher.OutputWeighted`)."""
        return left

    # -- shared -----------------------------------------------------------------------------------
    def check_all_stats(self, stats, names: Iterable[str]) -> None:
        """:meth:`check_stats` for each of ``names`` in ``stats`` (an :class:`ActivationStats` or ``None``); two or
        more names without statistics are one error naming them all (:func:`missing_stats_error`: a MoE's unreached
        experts are often many).  A method that needs no statistics checks nothing."""
        if not self.needs:
            return
        names = list(names)
        missing = [n for n in names if stats is None or n not in stats]
        if len(missing) > 1:
            raise ValueError(missing_stats_error(self.name, missing))
        for n in names:
            self.check_stats(stats[n] if stats is not None and n in stats else None, n)

    def check_stats(self, stats: ChannelStats | None, name: str) -> None:
        if not self.needs:
            return
        if stats is None:
            expert = ".experts." in name
            raise ValueError(
                f"method {self.name!r} needs calibration statistics for layer {name!r}; none given"
                + ("; the calibration forwards never reached it (a mixture-of-experts expert its router never chose "
                   "on these batches): calibrate on more or more varied tokens, or leave the layer out of the "
                   f"targets (exclude: ['{name}'])" if expert else
                   "; if they came from collect_stats, the calibration forwards never called this module (a branch "
                   "these batches do not take, or a parent that uses its weight without calling it): leave it out "
                   f"of the targets (exclude: ['{name}']) or calibrate on inputs that reach it"))
        if "gram" in self.needs and stats.gram is None:
            raise ValueError(f"method {self.name!r} needs a Gram matrix for layer {name!r}; "
                             "collect statistics with needs including 'gram' (with_gram=True)")
        if "abs" in self.needs and stats.abs_sum is None:
            raise ValueError(f"method {self.name!r} needs abs-mean/abs-max statistics for layer {name!r}; "
                             "collect statistics with needs including 'abs'")
        if stats.count == 0:
            raise ValueError(f"statistics for layer {name!r} saw no tokens; did calibration run?")
        if stats.cross is not None and not self.dense_targets:
            raise ValueError(f"method {self.name!r} has no dense-target form (layer {name!r}'s statistics carry a "
                             "cross Gram); calibration.dense_targets needs method: svd_llm")
        stats.check_finite(name)
        if "gram" in self.needs and stats.count < stats.n:
            _warn_small_calibration(self.name, stats, name)

    def corrected(self, weight: torch.Tensor, stats: ChannelStats | None, name: str) -> torch.Tensor:
        """The full-rank dense-target optimum (``calibration.correct_dense``); ``svd_llm`` has one."""
        raise ValueError(f"method {self.name!r} has no dense-target form; calibration.correct_dense needs svd_llm")

    @torch.no_grad()
    def spectrum(self, weight: torch.Tensor, stats: ChannelStats | None, name: str) -> torch.Tensor:
        """Singular values (descending, float64) of the transformed weight."""
        self.check_stats(stats, name)
        mat, _ = self.transformed(weight.detach().double(), stats, name)
        return singular_values(mat, self.config.solver)

    @torch.no_grad()
    def decompose(self, weight: torch.Tensor, stats: ChannelStats | None, rank: int, name: str) -> Factors:
        """Factors of ``weight (m x n)`` at ``rank``, in float64 on the weight's device."""
        self.check_stats(stats, name)
        mat, ctx = self.transformed(weight.detach().double(), stats, name)
        u, s, vh = thin_svd(mat, self.config.solver, name)
        if not (all_finite(s) and all_finite(u) and all_finite(vh)):
            raise FloatingPointError(f"SVD of layer {name!r} produced non-finite values")
        rank = min(rank, s.numel())
        beta = self.config.beta
        s_r = s[:rank]
        up = self.unmap_left(u[:, :rank] * s_r.pow(1.0 - beta), ctx)
        down = self.unmap(s_r.pow(beta)[:, None] * vh[:rank], ctx)
        tail = s[rank:]
        factors = Factors(up, down, float(tail.square().sum().sqrt()), float(s.square().sum()))
        if not (all_finite(factors.up) and all_finite(factors.down)):
            raise FloatingPointError(f"decomposition of layer {name!r} produced non-finite factors")
        return factors


def thin_svd(mat: torch.Tensor, solver: str = "gram_eigh",
             name: str = "?") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(u, s, vh)`` with ``mat ≈ u diag(s) vh``, ``s`` descending: ``torch.linalg.svd(mat, full_matrices=False)``'s
    shapes and order.

    ``"svd"`` calls exactly that.  ``"gram_eigh"`` takes the eigenvectors of the smaller Gram side, e.g. ``V`` of
    ``matᵀmat`` for ``m >= n``, and sets ``s_i = ‖mat v_i‖``, ``u_i = mat v_i / s_i``, ``vh = Vᵀ`` (sorted by ``s``);
    for ``m < n`` the same from ``mat matᵀ``.  Since ``V`` is orthonormal, ``u diag(s) vh = mat V Vᵀ = mat``, a
    truncation to ``r`` triplets is the projection ``mat V_r V_rᵀ`` onto the top-``r`` right singular subspace, and
    ``sqrt(Σ_{i>r} s_i²)`` is its exact error: for any ``β``, ``u_r s_r^(1-β)`` and ``s_r^β vh_r`` multiply back to it
    (an ``s_i = 0`` divides by 1).  In two probes on 2 CPU cores in float64 it ran 1.6-1.8x (576 x 576) to 4-5x
    (2048 x 5632) faster than the SVD, with the same rank-``r/2`` truncation error to 7 digits on spectra spanning 9
    decades (whole decompositions: ``docs/results/compression_cost.md``).  The eigenvectors
    of singular values below about ``sqrt(ε) ‖mat‖`` (1.5e-8 of the largest in float64) are mixed among themselves:
    those ``s_i`` are not the exact singular values, but still the norms of what each triplet carries, under ``ε``
    of the energy."""
    if solver == "svd":
        return torch.linalg.svd(mat, full_matrices=False)
    if not all_finite(mat):
        raise FloatingPointError(f"the matrix to factor for layer {name!r} has non-finite values")
    gram, tall = _gram_side(mat, solver)
    _, vecs = torch.linalg.eigh(gram)
    image = mat @ vecs if tall else (vecs.T @ mat).T  # columns: mat v_i, or matᵀ u_i
    s, order = torch.linalg.vector_norm(image, dim=0).sort(descending=True)
    image = image[:, order].div_(torch.where(s > 0, s, torch.ones_like(s)))  # the gather's copy, scaled in place
    vecs = vecs[:, order]
    return (image, s, vecs.T) if tall else (vecs, s, image.T)


def singular_values(mat: torch.Tensor, solver: str = "gram_eigh") -> torch.Tensor:
    """The singular values alone (``torch.linalg.svdvals`` for ``"svd"``): for ``"gram_eigh"`` the square roots of
    the Gram side's eigenvalues, without eigenvectors; those below about ``sqrt(ε) ‖mat‖`` are noise, and carry
    under ``ε`` of the energy."""
    if solver == "svd":
        return torch.linalg.svdvals(mat)
    return torch.linalg.eigvalsh(_gram_side(mat, solver)[0]).flip(-1).clamp_min(0).sqrt()


def _gram_side(mat: torch.Tensor, solver: str) -> tuple[torch.Tensor, bool]:
    """``(matᵀmat, True)`` for a tall or square ``mat``, else ``(mat matᵀ, False)``: the smaller Gram side that
    ``gram_eigh`` decomposes (any other ``solver`` but ``svd`` is refused)."""
    if solver != "gram_eigh":
        raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
    tall = mat.shape[0] >= mat.shape[1]
    return (mat.T @ mat if tall else mat @ mat.T), tall


def stats_needs(*configs: MethodConfig | str) -> frozenset[str]:
    """The calibration statistics the given methods need, e.g. ``{"gram"}`` for ``svd_llm``
    (the ``needs`` of :class:`compression.collector.StatsCollector`)."""
    return frozenset().union(*(build_method(c).needs for c in configs))


# (id of the statistics, layer, token count) -> the statistics, weakly: each is warned about once,
# although check_stats runs for the pre-check, the allocation spectrum and the decomposition
_WARNED_SMALL: dict[tuple[int, str, int], weakref.ref] = {}
_WARNED_LOCK = threading.Lock()  # decompositions may run in worker threads (compression.parallel)


def _warn_small_calibration(method: str, stats: ChannelStats, name: str) -> None:
    """Warn (once per statistics object and layer) that ``N < n`` tokens cannot whiten ``n`` channels."""
    key = (id(stats), name, stats.count)
    with _WARNED_LOCK:
        known = _WARNED_SMALL.get(key)
        if known is not None and known() is stats:
            return
        for stale in [k for k, ref in _WARNED_SMALL.items() if ref() is None]:
            del _WARNED_SMALL[stale]
        _WARNED_SMALL[key] = weakref.ref(stats)
    # XᵀX of N < n tokens has rank <= N: the factors are fitted to the N directions the sample visited
    log.warning(
        "layer %r: calibration saw %d tokens for %d input channels, fewer than whitening needs; the Gram has "
        "rank <= %d, so method %r fits the factors to those directions only (svd_llm adds jitter, svd_llm_v2 "
        "drops the unseen ones). Calibrate on at least %d tokens for this layer.",
        name, stats.count, stats.n, stats.count, method, stats.n,
    )


def build_method(config: MethodConfig | str, **kwargs: object) -> Method:
    """Method from a config instance, or from a registered name plus that config's fields."""
    if isinstance(config, str):
        if config not in METHODS:
            raise ValueError(f"unknown compression method {config!r}; choose one of {sorted(METHODS)}")
        method_cls = METHODS[config]
        try:
            config = method_cls.config_type(**kwargs)
        except TypeError as err:
            fields = [f.name for f in dataclasses.fields(method_cls.config_type)]
            raise ValueError(f"bad arguments for method {method_cls.name!r}: {err}; valid fields: {fields}") from None
    elif kwargs:
        raise ValueError("pass method arguments inside the config instance, not as keywords")
    for method_cls in METHODS.values():
        if type(config) is method_cls.config_type:
            return method_cls(config)
    raise ValueError(f"no method registered for config type {type(config).__name__}; known: {sorted(METHODS)}")


def method_config_from_dict(data: dict) -> MethodConfig:
    """Inverse of :meth:`MethodConfig.to_dict`."""
    data = dict(data)
    name = data.pop("name")
    return build_method(name, **data).config


# --------------------------------------------------------------------------------------------------
@dataclass
class SVDConfig(MethodConfig):
    """Plain truncated SVD of the weight: no calibration data."""


@register
class SVD(Method):
    name = "svd"
    config_type = SVDConfig

    def transformed(self, weight, stats, name):
        return weight, None

    def unmap(self, right, ctx):
        return right


@dataclass
class ASVDConfig(MethodConfig):
    """ASVD: scale input channels by ``s = stat^alpha`` before the SVD.

    ``scaling``: ``"abs_mean"`` (mean |x| per channel) or ``"abs_max"``.
    ``alpha``: the exponent (0.5 in the paper).  ``floor``: channels whose statistic is below
    ``floor * max`` are clamped there so the inverse scaling stays finite.
    """

    scaling: str = "abs_mean"
    alpha: float = 0.5
    floor: float = 1e-6

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.scaling not in ("abs_mean", "abs_max"):
            raise ValueError(f"asvd scaling must be 'abs_mean' or 'abs_max', got {self.scaling!r}")
        if not 0.0 < self.alpha <= 2.0:
            raise ValueError(f"asvd alpha must lie in (0, 2], got {self.alpha}")
        if not 0.0 < self.floor < 1.0:
            raise ValueError(f"asvd floor must lie in (0, 1), got {self.floor}")


@register
class ASVD(Method):
    name = "asvd"
    config_type = ASVDConfig
    needs = frozenset({"abs"})

    def transformed(self, weight, stats, name):
        cfg: ASVDConfig = self.config  # type: ignore[assignment]
        stat = stats.abs_mean if cfg.scaling == "abs_mean" else stats.abs_max
        stat = stat.to(weight.device, torch.float64)
        if float(stat.max()) <= 0.0:
            raise ValueError(f"asvd: every input channel of layer {name!r} was zero during calibration")
        scale = stat.clamp_min(cfg.floor * float(stat.max())).pow(cfg.alpha)
        return weight * scale, scale

    def unmap(self, right, ctx):
        return right / ctx
