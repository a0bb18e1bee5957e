"""Forward-pass FLOPs, broken down by sub-module, with ``torch.utils.flop_counter``.

``FlopCounterMode`` counts each dispatched aten op with its analytic formula (a matmul
``[m, k] × [k, n]`` is ``2mkn`` FLOPs; ``scaled_dot_product_attention`` over ``N`` queries,
``M`` keys and width ``d`` per head is ``4 N M d`` per head; convolutions likewise).
Element-wise ops, norms and softmax are not counted, so the totals are the
multiply-accumulate work that dominates transformers.

A per-component breakdown is taken by snapshotting the running total in forward pre-
and post-hooks of the chosen modules: ``flops(module) = total_after - total_before``,
summed over every call.  A prefix naming an ``nn.ModuleList`` (never called itself) is
expanded to its children, so ``"aggregator.frame_blocks"`` sums the 24 frame blocks.

Fake (meta) tensors work: build the model under ``torch.device("meta")`` and pass meta
inputs to count the 1B VGGT without allocating its weights (1B, 518x518, no track head:
3647 GFLOPs for 1 frame, 39567 for 8).  Counting runs under ``no_grad`` with
``nn.MultiheadAttention``'s fused fast path switched off, whose kernels would otherwise
hide part of their matmuls, so CPU and meta counts agree.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger(__name__)

VGGT_COMPONENTS = (
    "aggregator.patch_embed",
    "aggregator.frame_blocks",
    "aggregator.global_blocks",
    "camera_head",
    "depth_head",
    "point_head",
    "track_head",
)


ATTENTION_OPS = (  # the aten kernels scaled_dot_product_attention dispatches to, CPU and CUDA
    "_scaled_dot_product_flash_attention_for_cpu",
    "_scaled_dot_product_flash_attention",
    "_scaled_dot_product_efficient_attention",
    "_scaled_dot_product_cudnn_attention",
)


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """``2 N M (d + d_v)`` per query head (``4 N M d`` when ``d_v = d``), as torch counts attention, with
    grouped-query shapes too: query ``[B, h, N, d]``, key / value ``[B, h_kv, M, d]`` with ``h_kv`` dividing
    ``h`` (``enable_gqa``, what transformers passes on CUDA), where torch's own formula asserts equal heads.
    The counter hands custom formulas the shapes of tensor arguments, not the tensors."""
    b, h, n, d = query_shape
    bk, hk, m, dk = key_shape
    bv, hv, mv, dv = value_shape
    if (bk, dk) != (b, d) or (bv, hv, mv) != (bk, hk, m) or h % hk:
        raise ValueError(f"attention FLOPs: incompatible query {tuple(query_shape)}, key {tuple(key_shape)}, "
                         f"value {tuple(value_shape)}")
    return 2 * b * h * n * m * (d + dv)


def _extra_formulas() -> dict[Any, Callable[..., int]]:
    """Attention formulas that replace or add to torch's counter.

    torch 2.14 dispatches CPU ``scaled_dot_product_attention`` to
    ``_scaled_dot_product_flash_attention_for_cpu``, which its flop registry lacks, so the
    attention FLOPs would silently count as 0 on CPU while meta tensors count them; and its CUDA
    formulas assert on grouped-query attention (fewer key / value heads than query heads).
    """
    ops = (getattr(torch.ops.aten, name, None) for name in ATTENTION_OPS)
    return {op: _attention_flops for op in ops if op is not None}


def _hook_targets(model: nn.Module, prefix: str) -> list[nn.Module] | None:
    """Modules whose forward calls make up ``prefix``; None when it names a disabled (None) head."""
    parent, _, leaf = prefix.rpartition(".")
    try:
        owner = model.get_submodule(parent) if parent else model
    except AttributeError as err:
        raise ValueError(f"no sub-module {prefix!r} in {type(model).__name__}; check the prefix") from err
    module = getattr(owner, leaf, "missing")
    if module is None:
        return None
    if not isinstance(module, nn.Module):
        raise ValueError(f"no sub-module {prefix!r} in {type(model).__name__}; check the prefix")
    if isinstance(module, nn.ModuleList | nn.ModuleDict):
        return list(module.children())
    return [module]


def count_flops(
    model: nn.Module,
    *args: Any,
    prefixes: Sequence[str] | None = None,
    forward: Callable[..., Any] | None = None,
    **kwargs: Any,
) -> dict[str, float]:
    """GFLOPs of one forward call, in total and per component.

    Args:
        model: any module.
        *args, **kwargs: forward inputs (real or meta tensors).
        prefixes: dotted sub-module names to report (default: the model's direct
            children).  A prefix naming a disabled (None) head reports 0; an unknown
            path raises ``ValueError``.
        forward: callable to run instead of ``model(*args, **kwargs)``.

    Returns:
        ``{prefix: GFLOPs, ..., "other": GFLOPs outside the prefixes, "total": GFLOPs}``.
    """
    if prefixes is None:
        prefixes = [name for name, _ in model.named_children()]
    counts: dict[str, int] = {}
    handles = []
    counter = FlopCounterMode(display=False, custom_mapping=_extra_formulas())
    for prefix in prefixes:
        targets = _hook_targets(model, prefix)
        counts[prefix] = 0
        if targets is None:
            logger.info("count_flops: %s is disabled (None), reported as 0", prefix)
            continue
        starts: list[int] = []

        def pre_hook(_module, _inputs, _starts=starts) -> None:
            _starts.append(counter.get_total_flops())

        def post_hook(_module, _inputs, _outputs, _starts=starts, _prefix=prefix) -> None:
            counts[_prefix] += counter.get_total_flops() - _starts.pop()

        for target in targets:
            handles.append(target.register_forward_pre_hook(pre_hook))
            handles.append(target.register_forward_hook(post_hook))
    # FlopCounterMode's module tracker hooks autograd on module inputs that require grad;
    # views of parameters made under no_grad have no grad_fn, so freeze parameters meanwhile.
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    for p, _ in grad_flags:
        p.requires_grad_(False)
    # nn.MultiheadAttention's fused CPU/CUDA fast path hides part of its matmuls from the counter.
    mha_fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), counter:
            if forward is not None:
                forward(*args, **kwargs)
            else:
                model(*args, **kwargs)
    finally:
        for handle in handles:
            handle.remove()
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        torch.backends.mha.set_fastpath_enabled(mha_fastpath)
    total = counter.get_total_flops()
    result = {name: flops / 1e9 for name, flops in counts.items()}
    result["other"] = (total - sum(counts.values())) / 1e9
    result["total"] = total / 1e9
    return result


def vggt_flops(
    model: nn.Module | None = None,
    num_frames: int = 1,
    image_hw: tuple[int, int] = (518, 518),
    batch_size: int = 1,
    num_query_points: int = 0,
    device: str | torch.device = "meta",
) -> dict[str, float]:
    """GFLOPs of a VGGT forward per component (``VGGT_COMPONENTS``).

    Args:
        model: a VGGT; default = the 1B model without track head built on ``device``.
        num_frames: S; image_hw: (H, W), multiples of 14; batch_size: B.
        num_query_points: N > 0 runs the track head on N query points.
        device: where inputs (and the default model) live; "meta" needs no memory.
    """
    if model is None:
        from models.vggt import VGGT

        with torch.device(device):
            model = VGGT(enable_track=num_query_points > 0)
    model.eval()
    device = next(model.parameters()).device
    H, W = image_hw
    images = torch.zeros(batch_size, num_frames, 3, H, W, device=device)
    kwargs: dict[str, Any] = {}
    if num_query_points > 0:
        kwargs["query_points"] = torch.zeros(batch_size, num_query_points, 2, device=device)
    return count_flops(model, images, prefixes=VGGT_COMPONENTS, **kwargs)


def vlm_costs(model: nn.Module, inputs: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Parameters and forward GFLOPs of a VLM per part, for one forward on ``inputs`` (a processor batch).

    Parts (:func:`models.vlm.vlm_parts`): ``vision_tower``, ``projector``, ``language_model`` (with the
    input embedding) and ``lm_head`` (0 parameters when tied to the embedding).  Low-rank factors count
    as what they store; fake-quantized layers count as their float matmuls.
    """
    from models.vlm import vlm_parts

    parts = vlm_parts(model)
    flops = count_flops(model, prefixes=list(parts.values()), forward=lambda: model(**inputs, use_cache=False))
    head = model.get_submodule(parts["lm_head"])
    embedding = {id(p) for p in model.get_input_embeddings().parameters()}
    out = {}
    for role, name in parts.items():
        module = model.get_submodule(name)
        params = [p for p in module.parameters() if not (module is head and id(p) in embedding)]
        out[role] = {"params": sum(p.numel() for p in params), "gflops": flops[name]}
    return out
