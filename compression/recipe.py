"""The compression recipe: every setting of a compression run as plain data.

A recipe has three parts, run in this order by :func:`compression.compress_` (or stage by stage
by the Lightning callbacks, see :mod:`compression.pipeline`):

1. **low rank** -- ``method`` (+ ``method_args``), ``ratio`` (the fraction of the targeted
   parameters REMOVED), ``allocation`` (a registered strategy, :mod:`compression.allocation`)
   under a ``budget`` of parameters or FLOPs, ``targets`` / ``exclude`` / ``overrides``,
   ``joint_qkv`` (QSVD: the q/k/v of one attention module are one matrix);
2. **quantization** (:class:`QuantRecipe`) -- residual rotation ``H1`` + online Hadamard, the
   latent rotation ``H2``, the Σ split β, fake-quantized weights and activations;
3. **recovery** (:class:`LoRARecipe`) -- the alternating U/V LoRA stages.

:class:`CalibrationRecipe` says how much calibration data each stage reads.  The three sections are
defined in :mod:`compression.recipe_sections` (and importable from here).  Every field has a
command-line flag of the same name under ``--compression`` (``--compression.ratio 0.4``,
``--compression.quantization.weight_bits 4``, ``--compression.lora.steps [100,100]``).  A recipe
is validated when it is built, so a bad value fails before any model is loaded; it round-trips
through :meth:`Recipe.to_dict` / :meth:`Recipe.from_dict` and is stored in the plan of every
checkpoint, so a resumed run can tell whether it was asked to do something else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from compression.methods import MethodConfig, build_method
from compression.parallel import check_threads
from compression.recipe_sections import CalibrationRecipe, LoRARecipe, QuantRecipe, as_section


def check_ratio(value: float, what: str) -> None:
    if not (isinstance(value, int | float) and 0.0 < value < 1.0):
        raise ValueError(
            f"{what} must lie in (0, 1): it is the fraction of targeted parameters REMOVED "
            f"(0.2 keeps 80 %), got {value!r}"
        )


RUN_ONLY = ("calibration.progress", "calibration.stats_device", "calibration.block_device",
            "calibration.activations", "calibration.stream_weights", "device", "decompose_threads")
"""Recipe fields that do not change the compressed model (where the maths runs, progress bars)."""


@dataclass
class Recipe:
    """One compression run (see the module docstring).

    Args:
        method: ``svd``, ``asvd``, ``svd_llm``, ``svd_llm_v2``; ``null`` for no low-rank stage
            (rotation / quantization only, QuaRot-style).
        method_args: the method's own settings, e.g. ``{alpha: 0.5, scaling: abs_mean}`` for
            ``asvd`` or ``{beta: 0.5}``.
        ratio: fraction of the targeted parameters (or FLOPs, ``budget: flops``) to remove, in (0, 1).
        allocation: how ranks are spread over the targeted matrices: ``uniform``, ``v2``,
            ``greedy``, ``gradient``, ``kfac`` (with ``calibration.output_fisher``; see
            :mod:`compression.allocation`).
        budget: ``params`` (the ratio counts parameters) or ``flops`` (each matrix weighted by the
            tokens through it per forward, from the calibration statistics).
        max_ratio: upper bound on any one matrix's removal ratio under ``v2``.
        min_rank: rank every matrix keeps under the global allocations (``greedy``, ``gradient``, ``kfac``).
        dense_above_break_even: global allocations only -- a matrix given a rank at or above its
            break-even ``m n / (m + n)`` stays dense and the budget is spread again over the others.
        components: ``gradient`` only -- ``leading`` (each matrix keeps its leading triplets, as
            many as the ranking chose) or ``chosen`` (exactly the chosen triplets of joint groups).
        targets: module-name patterns to compress (globs; a bare name matches as a suffix);
            ``null`` uses the model family's default targets.
        exclude: patterns removed from the targets.
        overrides: ``pattern -> {ratio: x}`` or ``{rank: r}``; the first matching pattern fixes that
            layer's ratio or rank, outside the allocation.
        joint_qkv: factorize the q/k/v of each attention module as one matrix sharing a down
            projection (QSVD); ``ratio`` keeps its meaning.
        device: where the float64 decompositions run (``null``: each layer's device).
        decompose_threads: matrices decomposed at once, each in its own thread
            (:mod:`compression.parallel`).  On a CPU 2 finishes sooner than 1 (the LAPACK calls use
            the intra-op threads poorly at these sizes; ``docs/results/compression_cost.md``), but holds
            that many matrices' float64 working sets at once, in every calibration mode; 1 (default)
            decomposes one matrix at a time.  The factors are the same either way.
        calibration: how much calibration data the stages read.
        quantization: rotations, β and fake quantization after the low-rank stage.
        lora: U/V LoRA recovery after the low-rank stage.
    """

    method: str | None = "svd_llm"
    method_args: dict[str, Any] = field(default_factory=dict)
    ratio: float = 0.2
    allocation: str = "uniform"
    budget: Literal["params", "flops"] = "params"
    max_ratio: float = 0.95
    min_rank: int = 1
    dense_above_break_even: bool = False
    components: Literal["leading", "chosen"] = "leading"
    targets: list[str] | None = None
    exclude: list[str] = field(default_factory=list)
    overrides: dict[str, dict[str, float]] = field(default_factory=dict)
    joint_qkv: bool = False
    device: str | None = None
    decompose_threads: int = 1
    calibration: CalibrationRecipe = field(default_factory=CalibrationRecipe)
    quantization: QuantRecipe = field(default_factory=QuantRecipe)
    lora: LoRARecipe = field(default_factory=LoRARecipe)

    def __post_init__(self) -> None:
        if isinstance(self.method, MethodConfig):  # library convenience: Recipe(SVDLLMConfig(beta=0.3))
            args = dataclasses.asdict(self.method)
            self.method, self.method_args = self.method.method_name(), {**args, **self.method_args}
        self.method_args = dict(self.method_args or {})
        self.calibration = as_section(self.calibration, CalibrationRecipe, "calibration")
        self.quantization = as_section(self.quantization, QuantRecipe, "quantization")
        self.lora = as_section(self.lora, LoRARecipe, "lora")
        self.exclude = list(self.exclude or [])
        self.overrides = dict(self.overrides or {})
        if self.targets is not None:
            self.targets = list(self.targets)
            if not self.targets:
                raise ValueError("targets is an empty list; give patterns, or null for the family's defaults")
        check_threads(self.decompose_threads)
        if self.method is None:
            if self.method_args:
                raise ValueError("method_args given but method is null (no low-rank stage)")
            if not self.quantization.enabled:
                raise ValueError("method is null and quantization is off: the recipe does nothing; "
                                 "set method (e.g. svd_llm) or quantization.weight_bits / act_bits / rotate")
            if self.lora.enabled:
                raise ValueError("lora trains low-rank factors, but method is null (no low-rank stage)")
            if self.calibration.sequential:
                raise ValueError("calibration.mode: sequential runs the low-rank stage block by block, but method "
                                 "is null (no low-rank stage); use calibration.mode: all_at_once")
            if self.calibration.output_fisher is not None:
                raise ValueError("calibration.output_fisher weights the low-rank truncation; method: null has none: "
                                 "set a method or output_fisher: null")
            return
        build_method(self.method, **self.method_args)  # unknown method or bad method_args fail here
        check_ratio(self.ratio, "ratio")
        check_ratio(self.max_ratio, "max_ratio")
        from compression.allocation import ALLOCATORS

        if self.allocation not in ALLOCATORS:
            raise ValueError(f"unknown allocation {self.allocation!r}; choose one of {sorted(ALLOCATORS)}")
        if self.budget not in ("params", "flops"):
            raise ValueError(f"budget must be 'params' or 'flops', got {self.budget!r}")
        if self.components not in ("leading", "chosen"):
            raise ValueError(f"components must be 'leading' or 'chosen', got {self.components!r}")
        if self.allocation == "kfac" and self.calibration.output_fisher is None:
            raise ValueError("allocation: kfac ranks every singular triplet by the loss its removal costs, which "
                             "needs the output Fisher: set calibration.output_fisher (e.g. 0.1), or use greedy / "
                             "gradient")
        if self.components == "chosen" and self.allocation != "gradient":
            raise ValueError("components: chosen applies to allocation: gradient only")
        if not isinstance(self.min_rank, int) or self.min_rank < 1:
            raise ValueError(f"min_rank must be an integer >= 1, got {self.min_rank!r}")
        for pattern, spec in self.overrides.items():
            if not isinstance(spec, Mapping) or len(spec) != 1 or next(iter(spec)) not in ("ratio", "rank"):
                raise ValueError(f"overrides[{pattern!r}] must be {{ratio: x}} or {{rank: r}}, got {spec!r}")
            if "ratio" in spec:
                check_ratio(float(spec["ratio"]), f"overrides[{pattern!r}].ratio")
            elif not (float(spec["rank"]).is_integer() and spec["rank"] >= 1):
                raise ValueError(f"overrides[{pattern!r}].rank must be an integer >= 1, got {spec['rank']!r}")
        if self.calibration.sequential:
            if self.allocation == "gradient" and self.calibration.stream_weights:
                raise ValueError("allocation: gradient takes its ranks from a backward pass through the whole dense "
                                 "model (and every matrix's Gram at once), but calibration.stream_weights never "
                                 "holds the dense model: set stream_weights: false (sequential with the model in "
                                 "memory computes the gradient ranks first), or use a spectral allocation (v2, "
                                 "greedy: two streamed passes)")
            if self.calibration.staged and not build_method(self.method, **self.method_args).needs:
                raise ValueError(f"calibration.staged re-collects each group's statistics on the compressed inputs, "
                                 f"but method {self.method!r} reads no statistics; set staged: false or use a "
                                 "whitening method (svd_llm, svd_llm_v2) or asvd")
            if self.calibration.dense_targets and self.method != "svd_llm":
                raise ValueError(f"calibration.dense_targets has a closed form for method: svd_llm only (whitening "
                                 f"with a cross Gram), not {self.method!r}; use svd_llm or dense_targets: false")
            if self.calibration.correct_dense and not self.dense_above_break_even:
                raise ValueError("calibration.correct_dense corrects the matrices dense_above_break_even keeps dense; "
                                 "without it none is kept dense: set dense_above_break_even: true or "
                                 "correct_dense: false")
            if self.quantization.enabled:
                raise ValueError("calibration.mode: sequential runs the low-rank stage block by block; quantization "
                                 "in the same recipe is not supported: quantize the compressed model in a second run "
                                 "(method: null) or use calibration.mode: all_at_once")
        if self.quantization.enabled and self.lora.enabled:
            raise ValueError("quantization and lora in one recipe is not supported: the LoRA stages train float "
                             "factors; recover in one run, then quantize the recovered model in another")

    def all_at_once(self) -> Recipe:
        """This recipe with ``calibration.mode: all_at_once`` (the sequential-only settings at their defaults):
        what a sequential run with ``allocation: gradient`` runs first on the dense model for its ranks."""
        calibration = dataclasses.replace(self.calibration, mode="all_at_once", propagate="compressed",
                                          block_device=None, activations="device", stream_weights=False,
                                          dense_targets=False, correct_dense=False, target_alpha=1.0,
                                          staged=False)
        return dataclasses.replace(self, calibration=calibration)

    # -- what the stages need -----------------------------------------------------------------------
    @property
    def lowrank(self) -> bool:
        return self.method is not None

    def method_config(self) -> MethodConfig | None:
        return build_method(self.method, **self.method_args).config if self.method else None

    # -- plain data ---------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return _plain(dataclasses.asdict(self))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Recipe:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"recipe: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**dict(data))

    def differences(self, other: Recipe | Mapping[str, Any], ignore: tuple[str, ...] = RUN_ONLY) -> list[str]:
        """``field: this -> other`` for every setting that differs (dotted names for sections),
        leaving out the ``ignore``-d fields, which change how a run looks, not what it computes."""
        mine = _flatten(self.to_dict())
        theirs = _flatten(other.to_dict() if isinstance(other, Recipe) else Recipe.from_dict(other).to_dict())
        keys = sorted(set(mine) | set(theirs))
        return [f"{k}: {theirs.get(k)!r} -> {mine.get(k)!r}" for k in keys
                if k not in ignore and mine.get(k) != theirs.get(k)]


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping) and key in ("calibration", "quantization", "lora"):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out
