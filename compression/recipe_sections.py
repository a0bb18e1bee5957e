"""The three sections of a :class:`~compression.recipe.Recipe`, each a dataclass validated when built.

- :class:`CalibrationRecipe` (``calibration``) -- how much calibration data each stage reads and how the
  statistics are gathered (all at once, or block by block: :mod:`compression.sequential`);
- :class:`QuantRecipe` (``quantization``) -- rotations, the latent rotation, β and fake quantization
  (:mod:`compression.quantize_stage`);
- :class:`LoRARecipe` (``lora``) -- the alternating U/V LoRA recovery (:mod:`callbacks.lora`).

A section is given as its dataclass, as a mapping of its fields (plans, YAML) or as ``None`` (its defaults):
:func:`as_section`.  Errors name the field with its section (``calibration.max_batches``), as the command
line spells it (``--compression.calibration.max_batches``).  The three classes are re-exported by
:mod:`compression.recipe` and :mod:`compression`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal


def as_section(value: Any, cls: type, what: str) -> Any:
    """A nested section given as a dataclass, a mapping (library use, plans) or ``None`` (defaults)."""
    if value is None:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(value) - names)
        if unknown:
            raise ValueError(f"{what}: unknown field(s) {unknown}; valid fields: {sorted(names)}")
        return cls(**value)
    raise TypeError(f"{what} must be a {cls.__name__} or a mapping, got {type(value).__name__}")


@dataclass
class CalibrationRecipe:
    """How much calibration data the stages read (batches of the DataModule's calibration loader).

    Args:
        max_batches: batches for the activation statistics (``None``: the whole loader).
        gradient_batches: batches for the gradient importance of ``allocation: gradient``, evenly
            spaced over the loader (``None``: all).
        per_sample: split each gradient batch into single samples (QSVD's per-sample mean of
            squares; one backward per sample).
        stats_device: where the statistics accumulate (``None``: each layer's device).
        progress: show a progress bar on rank zero.
        mode: ``all_at_once`` (every targeted layer hooked in one pass over the whole model) or
            ``sequential`` (one block at a time: its statistics, its compression, then its
            outputs feed the next block; :mod:`compression.sequential`).  With ``allocation: gradient``
            the ranks are decided first on the dense model, exactly as ``all_at_once`` decides them (every
            matrix's Gram and a backward through the whole model: that stage needs the whole model in
            memory), then the blocks are compressed one by one at those ranks.
        propagate: ``sequential`` only -- the next block's inputs are the ``compressed`` block's
            outputs (error propagation, as SVD-LLM's sequential update and GPTQ) or the ``dense``
            block's (reproduces ``all_at_once`` exactly).
        dense_targets: ``sequential`` with ``propagate: compressed`` and ``method: svd_llm`` only -- fit each
            layer's factors to the output the layer has in the DENSE model on the same tokens,
            ``min ‖W X_d - W' X_c‖`` with ``X_c`` its inputs through the compressed blocks and ``X_d`` through
            the dense ones (asymmetric calibration, as GPTAQ does for quantization), instead of
            ``min ‖W X_c - W' X_c‖``.  A second, dense stream of block inputs is propagated alongside the
            compressed one, and each stream's statistics add a cross Gram (:mod:`compression.whitening`).
        target_alpha: with ``dense_targets`` -- how far the target moves towards the dense model's:
            ``‖W (X_c + α (X_d - X_c)) - W' X_c‖`` (1: the dense outputs, 0: SVD-LLM's own; QEP's propagation
            strength); the cross Gram is scaled by ``α``.
        correct_dense: with ``dense_targets`` and ``dense_above_break_even`` -- the matrices kept dense get the
            full-rank dense-target optimum (least squares ``W X_dᵀ X_c (X_cᵀ X_c)⁻¹``, regularized as the
            whitening is) instead of their weights: the same parameters.
        staged: ``sequential`` only -- within each block, take the statistics of the layers that read the
            same tensor (q/k/v; o; gate/up; down) group by group, each on the inputs that flow through the
            block's already-factorized earlier groups, as they will at inference (GPTQ's true-sequential
            order; groups and their order are found by hooking one forward of the block:
            :mod:`compression.staged`).  Up to one more block forward per group and batch.
        output_fisher: weight each factorized matrix's output rows by the squared calibration-loss gradient at
            that output, summed over the tokens of the ``gradient_batches`` batches (one backward each, on the
            dense model, unsplit), damped towards uniform weights by this ``λ`` in ``(0, 1]`` (1: no weighting;
            ``null``: off): the truncation then minimises the loss's Kronecker-factored second-order change
            instead of the plain output error (FWSVD's row weights on top of the method's input transform,
            :mod:`compression.output_fisher`).  Needs the family's ``training_loss``.
        output_fisher_full: with ``output_fisher`` -- the whole output-gradient covariance ``Σ_t g_t g_tᵀ`` (out x
            out per layer, damped the same way) instead of its diagonal: Kronecker-factored weights (GFWSVD).
        block_device: ``sequential`` only -- where each block runs while it is calibrated and
            compressed (``None``: where the model is); the model stays where it is otherwise.
        activations: ``sequential`` only -- where the calibration hidden states wait between
            blocks: ``device`` (the block device), ``host`` (CPU memory) or ``disk`` (a temporary
            directory, memory-mapped).
        stream_weights: ``sequential`` only -- build the model with its parameters on ``meta`` and read
            each block's weights from the model's local safetensors files just before that block runs
            (:mod:`compression.streaming`): the dense model is never whole in memory.  Each compressed
            block is written to a temporary folder and memory-mapped back when every block is done.
            The blocks run on ``block_device`` (default: the trainer's device).
    """

    max_batches: int | None = None
    gradient_batches: int | None = 16
    per_sample: bool = True
    stats_device: str | None = None
    progress: bool = True
    mode: Literal["all_at_once", "sequential"] = "all_at_once"
    propagate: Literal["compressed", "dense"] = "compressed"
    block_device: str | None = None
    activations: Literal["device", "host", "disk"] = "device"
    stream_weights: bool = False
    dense_targets: bool = False
    correct_dense: bool = False
    target_alpha: float = 1.0
    staged: bool = False
    output_fisher: float | None = None
    output_fisher_full: bool = False

    def __post_init__(self) -> None:
        for name in ("max_batches", "gradient_batches"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                raise ValueError(f"calibration.{name} must be an integer >= 1 or null, got {value!r}")
        choices = {"mode": ("all_at_once", "sequential"), "propagate": ("compressed", "dense"),
                   "activations": ("device", "host", "disk")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"calibration.{name} must be one of {list(allowed)}, got {getattr(self, name)!r}")
        if self.mode != "sequential" and (self.propagate != "compressed" or self.block_device is not None
                                          or self.activations != "device" or self.stream_weights
                                          or self.dense_targets):
            raise ValueError("calibration.propagate / block_device / activations / stream_weights / dense_targets "
                             "apply to calibration.mode: sequential only; set mode: sequential or leave them at "
                             "their defaults")
        if self.dense_targets and self.propagate != "compressed":
            raise ValueError("calibration.dense_targets fits compressed-stream inputs to dense-model outputs; with "
                             "propagate: dense both streams are the dense one: set propagate: compressed or "
                             "dense_targets: false")
        if not (isinstance(self.target_alpha, int | float) and 0.0 < self.target_alpha <= 1.0):
            raise ValueError(f"calibration.target_alpha must lie in (0, 1], got {self.target_alpha!r}")
        if self.target_alpha != 1.0 and not self.dense_targets:
            raise ValueError("calibration.target_alpha weighs the dense targets: set dense_targets: true or leave "
                             "target_alpha at 1")
        if self.correct_dense and not self.dense_targets:
            raise ValueError("calibration.correct_dense corrects kept-dense matrices towards the dense targets: set "
                             "dense_targets: true (and mode: sequential) or correct_dense: false")
        if self.staged and self.mode != "sequential":
            raise ValueError("calibration.staged orders the statistics within each block of the sequential mode; set "
                             "mode: sequential or staged: false")
        if self.dense_targets and self.stream_weights:
            raise ValueError("calibration.dense_targets with stream_weights is not supported; set one of them false")
        if self.output_fisher is not None:
            if not (isinstance(self.output_fisher, int | float) and not isinstance(self.output_fisher, bool)
                    and 0.0 < self.output_fisher <= 1.0):
                raise ValueError(f"calibration.output_fisher is the damping λ in (0, 1] of the output-row weights "
                                 f"(1: unweighted) or null (off), got {self.output_fisher!r}")
            if self.stream_weights:
                raise ValueError("calibration.output_fisher needs a backward through the whole dense model; "
                                 "stream_weights never holds it whole: set one of them off")
        elif self.output_fisher_full:
            raise ValueError("calibration.output_fisher_full chooses the form of the output Fisher weights: set "
                             "output_fisher (a damping in (0, 1]) or output_fisher_full: false")

    @property
    def sequential(self) -> bool:
        return self.mode == "sequential"


@dataclass
class QuantRecipe:
    """Rotations, β and fake quantization (QSVD / QuaRot); off unless bits or ``rotate`` are set.

    Args:
        weight_bits: weight bits (``None``: float weights).
        act_bits: activation bits, per token (``None``: float activations).
        weight_method: ``rtn`` (round-to-nearest with a clipping search) or ``gptq``.
        symmetric: symmetric weight grid (asymmetric adds a zero point).
        group_size: weight group size along the inputs (``None``: one scale per output row).
        clip_grid: clipping-search steps (shrink step ``1/clip_grid``; 0 disables the search).
        act_clip_ratio: activations are clipped to this fraction of each token's range.
        rotate: fuse the residual-stream rotation ``H1`` and the online Hadamard.
        rotation_kind: ``random_hadamard``, ``hadamard`` or ``orthogonal``.
        latent_rotation: fuse ``H2`` into every low-rank pair.
        beta_search: choose β on calibration data (``False`` keeps the method's β).
        beta_objective: ``output`` (per-pair quantized output error) or ``loss`` (calibration loss
            of the quantized model, one global β).
        betas: candidate β values.
        per_layer_beta: one β per pair (``True``) or one global β.
        calibration_tokens: captured input tokens per pair for the β search.
        max_batches: calibration batches for the β search / GPTQ Grams, evenly spaced.
        seed: seed of ``H1`` and ``H2``.
    """

    weight_bits: int | None = None
    act_bits: int | None = None
    weight_method: Literal["rtn", "gptq"] = "rtn"
    symmetric: bool = True
    group_size: int | None = None
    clip_grid: int = 100
    act_clip_ratio: float = 0.9
    rotate: bool = False
    rotation_kind: Literal["random_hadamard", "hadamard", "orthogonal"] = "random_hadamard"
    latent_rotation: bool = True
    beta_search: bool = False
    beta_objective: Literal["output", "loss"] = "output"
    betas: list[float] = field(default_factory=lambda: [i / 10 for i in range(11)])
    per_layer_beta: bool = True
    calibration_tokens: int = 2048
    max_batches: int | None = 8
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("weight_bits", "act_bits"):
            bits = getattr(self, name)
            if bits is not None and not (isinstance(bits, int) and 2 <= bits <= 16):
                raise ValueError(f"quantization.{name} must be an integer in [2, 16] or null, got {bits!r}")
        if self.weight_method not in ("rtn", "gptq"):
            raise ValueError(f"quantization.weight_method must be 'rtn' or 'gptq', got {self.weight_method!r}")
        if self.rotation_kind not in ("random_hadamard", "hadamard", "orthogonal"):
            raise ValueError(f"quantization.rotation_kind {self.rotation_kind!r} is not one of "
                             "'random_hadamard', 'hadamard', 'orthogonal'")
        if self.beta_objective not in ("output", "loss"):
            raise ValueError(f"quantization.beta_objective must be 'output' or 'loss', got {self.beta_objective!r}")
        if self.group_size is not None and self.group_size < 1:
            raise ValueError(f"quantization.group_size must be >= 1 or null, got {self.group_size}")
        if self.clip_grid < 0 or self.calibration_tokens < 1:
            raise ValueError("quantization.clip_grid must be >= 0 and quantization.calibration_tokens >= 1")
        if not 0.0 < self.act_clip_ratio <= 1.0:
            raise ValueError(f"quantization.act_clip_ratio must lie in (0, 1], got {self.act_clip_ratio}")
        self.betas = [float(b) for b in self.betas]
        if not self.betas or not all(0.0 <= b <= 1.0 for b in self.betas):
            raise ValueError(f"quantization.betas must be a non-empty list of values in [0, 1], got {self.betas}")
        if self.max_batches is not None and self.max_batches < 1:
            raise ValueError(f"quantization.max_batches must be >= 1 or null, got {self.max_batches}")
        if self.beta_search and not (self.weight_bits or self.act_bits):
            raise ValueError("quantization.beta_search chooses β for quantized factors: set weight_bits or act_bits")

    @property
    def enabled(self) -> bool:
        return self.weight_bits is not None or self.act_bits is not None or self.rotate


@dataclass
class LoRARecipe:
    """Alternating U/V LoRA recovery (off unless ``steps`` or ``epochs`` is set).

    Args:
        order: which factors each stage trains: ``[down, up]`` (V then U, SVD-LLM's alternation),
            ``[up, down]``, or ``both`` in a stage to train the U and V adapters together (e.g.
            ``[both, both]``: joint training, every step updating both factors for the same backward
            cost, with the adapters merged and restarted at the stage boundary); every factor must be
            trained in some stage.
        steps: optimizer steps per stage, one value or ``[stage1, stage2]``.
        epochs: epochs per stage instead of ``steps``.
        r: LoRA rank.
        alpha: LoRA alpha (update scale ``alpha / r``).
        dropout: LoRA dropout on the adapter input.
        learning_rate: per-stage learning rate (one value or two; ``None``: the module's).
        targets: patterns of low-rank layer names to adapt (``None``: every low-rank layer).
        distill: weight of distillation from the dense model's outputs in the training loss: 0 = the
            task loss only, 1 = distillation only (needs no labels; transfers what the dense model
            does on any text, not just the finetuning domain), in between a mix.  Keeps a frozen dense
            copy of the model (twice the weights in memory).
        temperature: distillation temperature (the loss is scaled by its square).
        schedule: learning rate within each stage: ``"constant"`` (default) or ``"cosine"`` (linear
            warm-up over ``warmup`` of the stage's steps, then a half cosine from the stage's rate towards
            0 at its last step; each stage restarts it). The module's own ``lr_schedule`` must stay
            ``constant`` with it.
        warmup: fraction of each stage's steps spent in the cosine schedule's linear warm-up, in [0, 1).
        autocast: ``"bfloat16"`` runs the training forward and backward (student and teacher) under
            ``torch.autocast`` in bfloat16 while the adapters, their gradients and the optimizer stay in
            float32; evaluation stays in the weights' dtype. On a CPU with AVX512-BF16 (Zen 4): a dense
            SmolLM2-135M distillation step of 4 x 256 tokens 9.7 s -> 5.4 s; the preset's 80 LoRA steps
            1001 s -> 754 s on 2 shared cores, same test perplexities (docs/results/llm_general.md). On a
            CPU without bf16 instructions it is emulated and slower: leave it off there.  ``None``
            (default): no autocast.  (``trainer.precision: bf16-mixed`` would autocast the validation and
            test perplexities too.)
        seed: seed of the stage's random draws: the adapters' initial values (``lora_A``) come from a generator
            seeded with it, and the global generator is reseeded with ``seed + 1`` when training starts (dropout
            masks and anything else drawn during fit; a resumed run is not reseeded).  ``None`` (default): the
            run's seed (``seed_everything``), else 0.  So the recovery does not depend on what the stages before
            it drew (a compression change that draws one number fewer would otherwise move every LoRA result).
    """

    order: list[str] = field(default_factory=lambda: ["down", "up"])
    steps: int | list[int] | None = None
    epochs: int | list[int] | None = None
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    learning_rate: float | list[float] | None = None
    targets: list[str] | None = None
    distill: float = 0.0
    temperature: float = 1.0
    schedule: str = "constant"
    warmup: float = 0.0
    autocast: str | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        self.order = list(self.order)
        if self.autocast not in (None, "bfloat16"):
            raise ValueError(f"lora.autocast takes 'bfloat16' or null, got {self.autocast!r} (float16 needs loss "
                             "scaling: use trainer.precision 16-mixed for it)")
        if not 0.0 <= self.distill <= 1.0:
            raise ValueError(f"lora.distill is a weight in [0, 1] (1 = distillation only), got {self.distill}")
        if not self.temperature > 0:
            raise ValueError(f"lora.temperature must be > 0, got {self.temperature}")
        trained = {side for entry in self.order for side in (("down", "up") if entry == "both" else (entry,))}
        if len(self.order) != 2 or not set(self.order) <= {"down", "up", "both"} or trained != {"down", "up"}:
            raise ValueError(f"lora.order takes one entry per stage (2), each 'down', 'up' or 'both', training both "
                             f"factors over the two stages: e.g. [down, up], [up, down], [both, both]; got "
                             f"{self.order!r}")
        if self.steps is not None and self.epochs is not None:
            raise ValueError("give lora.steps or lora.epochs, not both")
        for name in ("steps", "epochs", "learning_rate"):
            value = getattr(self, name)
            values = value if isinstance(value, list | tuple) else [value]
            if value is not None and len(values) not in (1, 2):
                raise ValueError(f"lora.{name} takes one value or one per stage (2), got {value!r}")
            if name != "learning_rate" and value is not None and any(int(v) < 0 for v in values):
                raise ValueError(f"lora.{name} must be >= 0, got {value!r}")
        if self.schedule not in ("constant", "cosine"):
            raise ValueError(f"lora.schedule takes 'constant' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.warmup < 1.0:
            raise ValueError(f"lora.warmup is a fraction of each stage's steps in [0, 1), got {self.warmup}")
        if self.r < 1 or not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora needs r >= 1 and 0 <= dropout < 1, got r={self.r}, dropout={self.dropout}")

    @property
    def enabled(self) -> bool:
        return self.steps is not None or self.epochs is not None
