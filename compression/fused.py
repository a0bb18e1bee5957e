"""Inference layout of a factored model: one down GEMM per shared input, measured layouts, merge-back.

A factored layer computes ``y = U (D x) + b`` with ``D (r x n)``, ``U (m x r)``.  Layers that read
the *same tensor* (q/k/v after the attention norm, gate/up after the MLP norm) can share one GEMM
for their down factors: stacking ``D_all = [D_1; D_2; ...]`` (``R = Σ r_i`` rows),

    z = D_all x   (R numbers per token),     y_i = U_i z[a_i : a_i + r_i] + b_i,

is the same arithmetic as the separate products (every entry of ``z`` is the same dot product),
done as one ``tokens x n x R`` GEMM instead of several thin ones: fewer calls, one pass over ``x``.
The stacked product is computed once per input tensor and memoized (:class:`compression.memo.InputMemo`,
as :class:`compression.joint.JointLatent` does), so the model's own code still
calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)`` and needs no change.

:func:`optimize_for_inference_` rewrites a compressed model in place for a deployment batch size
(``batch_tokens``: 1 for batch-1 decoding, the prompt length for prefill):

1. **merge-back**: a :class:`LowRankLinear` whose two GEMMs take longer than its dense product
   ``U D`` at ``batch_tokens`` (measured per shape, :mod:`compression.gemm_timing`) becomes a dense
   ``nn.Linear`` again (state-dict keys ``name.weight``/``name.bias``; the returned plan drops it);
2. **shared downs**: the factored layers that read one tensor (found by running ``example`` once
   with hooks, as :mod:`compression.stats` finds shared Grams) get one stacked down factor;
3. **layout**: every factor is stored in the measured faster of ``W`` / ``Wᵀ`` contiguous
   (:data:`compression.gemm_timing.LAYOUTS`);
4. **padding**: a down GEMM (stacked or a layer's own) computes ``R`` numbers per token, and ``R`` is a
   rank, not a hardware tile size.  On the 2-core AVX-512 CPU here, MKL's ``tokens x n x R`` product
   ran 8-20% *slower* per FLOP when ``R`` was not a multiple of 8 (256 tokens, 2 threads: ``R = 167``,
   ``n = 1536`` took 0.94 ms against 0.83-0.85 ms for ``R = 168``; ``R = 229`` took longer than
   ``R = 240``); the up GEMMs, whose inner size is the rank, showed no such effect (1 thread).
   So the down weight may get zero rows appended up to the next
   multiple of 8, 16 or 32 (:data:`PAD_MULTIPLES`), chosen by measurement like the layout and kept
   only when it is faster than ``R`` rows by more than ``pad_margin``.  The extra outputs are exact
   zeros that no up factor reads (each layer reads its ``rank`` columns), so the arithmetic of every
   layer is unchanged; the ranks, parameters and state dict are unchanged too (the padding is layout
   only, ``(R' - R) n`` more weight numbers in memory).

The factored layers keep their parameter names and values (``name.down.weight`` is a view into the
stacked storage, ``name.up.weight`` a transposed view where that layout won), so ``state_dict()``
gives the same tensors (made contiguous) and ``load_state_dict`` writes through into the stacked
storage.  Move or cast the model (``.to``) *before* optimizing: the stacked storage is shared by
several modules, and a conversion that would copy it is refused.  Optionally the model's forward is
wrapped in ``torch.compile`` (under compilation the memo is bypassed, and the repeated identical
stacked products of one attention call are merged in the compiled graph by
:class:`compression.graph_cse.SharedProductsPass`: inductor does not merge them by itself); for batch-1
decoding on a CPU, ``gemv=True`` also replaces the BLAS calls of the one-token products by generated
multiply-reduce kernels (:mod:`compression.gemv`).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from compression.block_capture import group_by_input, layer_calls
from compression.gemm_timing import LAYOUTS, GemmTimer
from compression.gemv import GemvPass
from compression.graph_cse import SharedProductsPass
from compression.lowrank import LowRankLinear
from compression.memo import InputMemo
from compression.plan import set_submodule

log = logging.getLogger(__name__)

PAD_MULTIPLES = (8, 16, 32)  # candidate down-GEMM output widths: R rounded up to these multiples


def padded_widths(rows: int, multiples: tuple[int, ...] = PAD_MULTIPLES) -> list[int]:
    """``rows`` and ``rows`` rounded up to each multiple (ascending, no repeats): the widths tried for a down GEMM."""
    if rows < 1:
        raise ValueError(f"a down GEMM needs at least one row, got {rows}")
    return sorted({rows, *(-(-rows // m) * m for m in multiples)})


def _padded(t: torch.Tensor, rows: int) -> torch.Tensor:
    """``t (R x n)`` with ``rows - R`` zero rows appended (``t`` itself when nothing is appended)."""
    if rows == t.shape[0]:
        return t
    return torch.cat([t, t.new_zeros(rows - t.shape[0], t.shape[1])], 0)


def _relayout(t: torch.Tensor, layout: str) -> torch.Tensor:
    """``t (out x in)`` with the same values, stored row-major or as a contiguous ``tᵀ``."""
    if layout == "rowmajor":
        return t.contiguous()
    if layout == "transposed":
        return t.t().contiguous().t()
    raise ValueError(f"unknown layout {layout!r}; choose one of {LAYOUTS}")


class SharedDown:
    """``z = x D_allᵀ`` for the stacked down factors of layers reading one tensor, once per tensor.

    ``weight`` is ``D_all (R' x n)`` (possibly a transposed view); not a module, so it adds no
    state-dict entry: its first ``R`` rows are the members' ``down.weight`` parameters, the others
    (``R' - R`` alignment padding, see the module docstring) are zeros nobody reads.  ``uses``: how
    many member layers read each product; the memo lets go of ``z`` after the last of them, so no
    product outlives its use (one per group would otherwise stay alive until the next forward:
    ``tokens x R'`` numbers each, gigabytes over a model at long prompts).
    """

    def __init__(self, weight: torch.Tensor, uses: int = 1) -> None:
        self.weight = weight
        # not a parameter, so torch.compile(dynamic=True) would make its sizes symbolic: its GEMM then has a
        # dynamic width (a generic kernel; compression.gemv leaves it to BLAS). Its sizes never change.
        torch._dynamo.mark_static(weight)
        self.memo = InputMemo(uses, "shared down product")

    @property
    def uses(self) -> int:
        return self.memo.uses

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return F.linear(x, self.weight)
        z = self.memo.get(x)
        return z if z is not None else self.memo.put(x, F.linear(x, self.weight))

    def clear(self) -> None:
        self.memo.clear()


class FastLowRankLinear(LowRankLinear):
    """A :class:`LowRankLinear` laid out for inference: its down factor is rows ``[start, start + rank)``
    of a :class:`SharedDown` (shared with other layers, or its own zero-padded one), or a plain
    weight of its own (``shared`` None), each factor in its measured layout.

    Same parameters, names and values as the layer it replaces (frozen: ``requires_grad=False``);
    shapes ``[..., in] -> [..., out]``.
    """

    def __init__(self, layer: LowRankLinear, shared: SharedDown | None, start: int, down: torch.Tensor,
                 up: torch.Tensor) -> None:
        w = layer.up.weight
        super().__init__(layer.in_features, layer.out_features, layer.rank, bias=layer.up.bias is not None,
                         device="meta", dtype=w.dtype)
        # an inference layout: the factors are frozen (the shared product would not train them)
        self.down.weight = nn.Parameter(down, requires_grad=False)
        self.up.weight = nn.Parameter(up, requires_grad=False)
        if layer.up.bias is not None:
            self.up.bias = nn.Parameter(layer.up.bias.detach(), requires_grad=False)
        self.shared, self.start = shared, start
        self.register_state_dict_post_hook(_contiguous_state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shared is None:
            return F.linear(F.linear(x, self.down.weight), self.up.weight, self.up.bias)
        # the stacked product reads the shared storage, not the down.weight parameter views. Grad mode is
        # tested first: under no_grad a compiled forward never reads down.weight, so dynamo does not guard it
        if torch.is_grad_enabled() and self.down.weight.requires_grad:
            raise RuntimeError("a model laid out by optimize_for_inference_ is for inference: its shared down "
                               "factors get no gradients; train (or LoRA-tune) the model before optimizing it")
        z = self.shared(x)[..., self.start:self.start + self.rank]
        return F.linear(z, self.up.weight, self.up.bias)

    def _apply(self, fn, recurse: bool = True):
        if self.shared is not None and fn(self.shared.weight) is not self.shared.weight:
            raise RuntimeError(
                "this model was laid out for inference (optimize_for_inference_): its stacked down factors "
                "are shared by several layers and cannot be moved or cast; move/cast the model first, then "
                "optimize it (or reload the checkpoint)")
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        shared = f", shared down rows {self.start}:{self.start + self.rank}" if self.shared is not None else ""
        return super().extra_repr() + shared


def _contiguous_state(module, state_dict, prefix, local_metadata) -> None:
    """Saved tensors are contiguous copies: views into shared storage do not survive safetensors."""
    for key in list(state_dict):
        if key.startswith(prefix) and not state_dict[key].is_contiguous():
            state_dict[key] = state_dict[key].contiguous()


@dataclass
class InferenceReport:
    """What :func:`optimize_for_inference_` did and the GEMM times it decided by (seconds per call).

    ``layers[name] = {"action": "merged" | "factored", "dense_s", "factored_s", "down", "up"}``
    (``down``/``up``: the chosen layouts); ``groups``: the layers sharing one down GEMM;
    ``padding``: ``{first layer of a down GEMM: (R, R')}`` for each down GEMM given zero rows;
    ``plan``: the given plan with merged layers removed (``None`` when no plan was given).
    """

    batch_tokens: int
    layers: dict[str, dict] = field(default_factory=dict)
    groups: list[list[str]] = field(default_factory=list)
    padding: dict[str, tuple[int, int]] = field(default_factory=dict)
    plan: dict | None = None
    compiled: bool = False
    seconds: float = 0.0

    @property
    def merged(self) -> list[str]:
        return [n for n, v in self.layers.items() if v["action"] == "merged"]

    def gemm_speedup(self) -> float:
        """Σ dense / Σ chosen GEMM time over the factored layers (shared downs counted per layer)."""
        dense = sum(v["dense_s"] for v in self.layers.values())
        chosen = sum(min(v["dense_s"], v["factored_s"]) if v["action"] == "merged" else v["factored_s"]
                     for v in self.layers.values())
        return dense / chosen if chosen > 0 else float("nan")


def find_shared_inputs(model: nn.Module, names: list[str], example: Callable[[nn.Module], object]) -> list[list[str]]:
    """Groups (in call order) of ``names`` whose modules receive the very same tensor in ``example(model)``."""
    return group_by_input(layer_calls(model, {n: n for n in names}, example))


def _as_example(example) -> Callable[[nn.Module], object] | None:
    if example is None or callable(example):
        return example
    return lambda m: m(**example) if isinstance(example, dict) else m(example)


def _fusable(module: nn.Module) -> bool:
    return (isinstance(module, LowRankLinear) and not isinstance(module, FastLowRankLinear)
            and type(module.down) is nn.Linear and type(module.up) is nn.Linear)


def compile_forward_(model: nn.Module, cpp_wrapper: bool = False, gemv: bool = False) -> nn.Module:
    """Wrap ``model.forward`` in ``torch.compile(dynamic=True)`` with :class:`SharedProductsPass`: the compiled
    graph computes each shared down product once, as the eager memo does (inductor does not merge the
    repeated GEMMs itself).  Compile a dense baseline with this too, for a like-for-like comparison.

    ``cpp_wrapper``: inductor calls the graph's kernels and GEMMs from generated C++ instead of Python.
    That cuts a fixed cost per call, which matters where calls are many and small: batch-1 decoding of a
    factored model. On 2 CPU cores, SmolLM2 decoding got 7 % (dense) and 10 % (ratio 0.6) faster. Compiling
    took 3-5x longer (125 / 233 s against 34 / 45 s; docs/results/llm_efficiency.md).

    ``gemv``: every one-token product on the CPU becomes an inductor-generated multiply-reduce kernel
    instead of a BLAS call (:class:`compression.gemv.GemvPass`). This is for batch-1 decoding, where BLAS
    streamed the weights at well under memory speed on the machine measured; products with more rows are
    left to BLAS. Float32 rounding differs from BLAS (about 1e-6 relative).
    """
    options = {"post_grad_custom_pre_pass": SharedProductsPass()}
    if cpp_wrapper:
        options["cpp_wrapper"] = True
    if gemv:
        options["post_grad_custom_post_pass"] = GemvPass()
    model.forward = torch.compile(model.forward, dynamic=True, options=options)
    return model


@torch.no_grad()
def optimize_for_inference_(
    model: nn.Module,
    batch_tokens: int = 1,
    example: object = None,
    merge: str = "auto",
    layout: str = "auto",
    timer: GemmTimer | None = None,
    plan: dict | None = None,
    merge_margin: float = 0.1,
    compile: bool = False,
    pad: str = "auto",
    pad_margin: float = 0.03,
    cpp_wrapper: bool = False,
    gemv: bool = False,
) -> InferenceReport:
    """Lay out every :class:`LowRankLinear` of ``model`` for inference at ``batch_tokens`` tokens per forward.

    Args:
        example: a forward to discover layers that share an input: ``fn(model)``, a batch dict
            (``model(**batch)``) or a tensor; ``None``: no shared downs (layout and merge only).
        merge: ``"auto"`` (merge back a layer whose factored GEMMs are measured slower than its
            dense product by more than ``merge_margin``) or ``"never"``.
        layout: ``"auto"`` (the measured faster layout per factor), ``"rowmajor"`` or ``"transposed"``.
        timer: the GEMM timer (default: :class:`GemmTimer` with the on-disk cache).
        plan: the model's compression plan; the report's ``plan`` is a copy without merged layers.
        compile: wrap ``model.forward`` in ``torch.compile(dynamic=True)`` (:func:`compile_forward_`).
        cpp_wrapper: with ``compile``, inductor's C++ wrapper (:func:`compile_forward_`).
        gemv: with ``compile`` and ``batch_tokens=1``, the one-token products as generated kernels
            (:func:`compile_forward_`). The GEMM timer measures BLAS calls, which these kernels replace,
            so its timings choose nothing (the report still gives them). ``"auto"`` means row-major factors
            (the layout the kernels read fastest in a probe: SmolLM2 at 0.6, 2 CPU threads, 14.7 ms per token
            against 18.5 transposed and 16.8 with the BLAS-measured layouts; docs/results/llm_efficiency.md),
            no padding and no merge-back (a factored layer reads fewer bytes).
        pad: ``"auto"`` (append zero rows to a down GEMM's weight, up to the measured fastest of the
            widths :func:`padded_widths` gives, when that is faster than no padding by more than
            ``pad_margin``) or ``"never"``.

    Layers already laid out, or whose factors are not plain ``nn.Linear`` (quantized), are left alone.
    """
    if merge not in ("auto", "never"):
        raise ValueError(f"merge must be 'auto' or 'never', got {merge!r}")
    if layout not in ("auto", *LAYOUTS):
        raise ValueError(f"layout must be 'auto' or one of {LAYOUTS}, got {layout!r}")
    if pad not in ("auto", "never"):
        raise ValueError(f"pad must be 'auto' or 'never', got {pad!r}")
    if not 0.0 <= pad_margin < 1.0:
        raise ValueError(f"pad_margin must lie in [0, 1), got {pad_margin}")
    if batch_tokens < 1:
        raise ValueError(f"batch_tokens must be >= 1, got {batch_tokens}")
    if cpp_wrapper and not compile:
        raise ValueError("cpp_wrapper=True applies to the compiled forward: pass compile=True as well")
    if gemv and not compile:
        raise ValueError("gemv=True applies to the compiled forward: pass compile=True as well")
    if gemv and batch_tokens != 1:
        raise ValueError(f"gemv=True rewrites one-token products; batch_tokens={batch_tokens} would leave them to "
                         "BLAS: optimize with batch_tokens=1, or without gemv")
    if gemv:  # the timer measures BLAS, not the generated kernels: its timings choose nothing
        merge = "never" if merge == "auto" else merge
        layout = "rowmajor" if layout == "auto" else layout
        pad = "never" if pad == "auto" else pad
    start_time = time.perf_counter()
    timer = timer or GemmTimer()
    report = InferenceReport(batch_tokens=batch_tokens)
    names = [n for n, m in model.named_modules() if _fusable(m)]
    if not names:
        raise ValueError("optimize_for_inference_: the model has no LowRankLinear layer with plain nn.Linear "
                         "factors (compress it first; quantized factors are not supported)")

    def best(out_f: int, in_f: int, ref: torch.Tensor) -> tuple[float, str]:
        options = LAYOUTS if layout == "auto" else (layout,)
        times = {lay: timer.seconds(out_f, in_f, batch_tokens, lay, ref.dtype, ref.device) for lay in options}
        choice = min(times, key=times.get)
        return times[choice], choice

    def best_down(rows: int, in_f: int, ref: torch.Tensor) -> tuple[float, str, int]:
        """(seconds, layout, width) of the fastest down GEMM, padded to ``width >= rows`` rows or not."""
        seconds, lay = best(rows, in_f, ref)
        if pad == "never":
            return seconds, lay, rows
        padded = [(*best(w, in_f, ref), w) for w in padded_widths(rows) if w > rows]
        fastest = min(padded, key=lambda c: c[0], default=None)
        if fastest is not None and fastest[0] < (1 - pad_margin) * seconds:
            return fastest
        return seconds, lay, rows

    for name in names:
        layer = model.get_submodule(name)
        ref = layer.up.weight
        dense_s = timer.seconds(layer.out_features, layer.in_features, batch_tokens, "rowmajor", ref.dtype, ref.device)
        down_s, down_layout, width = best_down(layer.rank, layer.in_features, ref)
        up_s, up_layout = best(layer.out_features, layer.rank, ref)
        action = "merged" if merge == "auto" and dense_s < (1 - merge_margin) * (down_s + up_s) else "factored"
        report.layers[name] = {"action": action, "dense_s": dense_s, "factored_s": down_s + up_s,
                               "down": down_layout, "up": up_layout, "width": width}
        if action == "merged":
            set_submodule(model, name, layer.to_linear())
    timer.save()

    factored = [n for n in names if report.layers[n]["action"] == "factored"]
    run = _as_example(example)
    groups = find_shared_inputs(model, factored, run) if run is not None else []
    grouped = {n for g in groups for n in g}
    groups += [[n] for n in factored if n not in grouped]  # layers the example never reached
    for group in groups:
        layers = [model.get_submodule(n) for n in group]
        if len({(lay.in_features, lay.up.weight.dtype, lay.up.weight.device) for lay in layers}) != 1:
            raise RuntimeError(f"layers {group} read one tensor but differ in input size, dtype or device")
        stacked = torch.cat([lay.down.weight for lay in layers], 0)
        if len(group) == 1:
            spec = report.layers[group[0]]
            stack_layout, width = spec["down"], spec["width"]
        else:
            _, stack_layout, width = best_down(stacked.shape[0], stacked.shape[1], layers[0].up.weight)
        if len(group) == 1 and width == layers[0].rank:  # a layer of its own, nothing to pad: no memo
            fast = FastLowRankLinear(layers[0], None, 0, _relayout(layers[0].down.weight, stack_layout),
                                     _relayout(layers[0].up.weight, report.layers[group[0]]["up"]))
            set_submodule(model, group[0], fast)
            continue
        shared = SharedDown(_relayout(_padded(stacked, width), stack_layout), uses=len(group))
        if width > stacked.shape[0]:
            report.padding[group[0]] = (stacked.shape[0], width)
        start = 0
        for name, lay in zip(group, layers):
            down = shared.weight[start:start + lay.rank]
            report.layers[name]["down"] = f"shared {stack_layout}" if len(group) > 1 else stack_layout
            report.layers[name]["width"] = width
            set_submodule(model, name, FastLowRankLinear(lay, shared, start, down,
                                                         _relayout(lay.up.weight, report.layers[name]["up"])))
            start += lay.rank
        if len(group) > 1:
            report.groups.append(list(group))
    timer.save()

    if plan is not None:
        report.plan = copy.deepcopy(plan)
        for name in report.merged:
            report.plan["layers"].pop(name, None)
        report.plan["inference"] = {"merged": report.merged, "batch_tokens": batch_tokens}
    if compile:
        compile_forward_(model, cpp_wrapper=cpp_wrapper, gemv=gemv)
        report.compiled = True
    report.seconds = time.perf_counter() - start_time
    log.info("inference layout at %d tokens: %d layers, %d merged back, %d shared-down groups, %d padded down "
             "GEMMs, GEMM-time speed-up %.2fx (%d shapes measured)", batch_tokens, len(names), len(report.merged),
             len(report.groups), len(report.padding), report.gemm_speedup(), timer.measured)
    return report
