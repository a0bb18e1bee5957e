"""Logit distillation for causal LMs without materialising the logits: the LM head, both losses and their
gradient in chunks of positions.

``CausalLMSpec.distillation_loss`` is ``T² · mean_t KL(p_teacher,t ‖ p_student,t)`` and the next-token NLL of
the same student forward.  Written on full logits it costs, per step, several float32 passes over
``[batch, seq, vocab]`` tensors (SmolLM2: 4 x 255 x 49152 = 50 M elements, 200 MB each): the casts, two log-
softmaxes, their difference, the exponential, the products, and the same again in the backward -- on 2 CPU
cores 2.5 s of a 6.5 s LoRA step, more than the teacher's whole forward.  Here the head runs on ``chunk``
positions at a time, from the final hidden states of the two decoders, and the gradient of the distillation
term with respect to the student's hidden states is formed in the same pass,
``∂/∂z (T² w KL) = (w / T) (softmax(z_s / T) − softmax(z_t / T))`` times the head weight, so the
backward is one multiply-add of a ``[positions, hidden]`` tensor; nothing of vocabulary size outlives a chunk.
The task term's gradient (``softmax(z_s) − onehot``) is recomputed chunk by chunk in the backward, and only when
the task term is weighted at all (``lora.distill < 1``).

The split into decoder and head is the Hugging Face one (``get_decoder()``, ``get_output_embeddings()``); it
is used only after a one-time check per model that ``head(decoder(x))`` reproduces the model's own last-position
logits (a model that scales, soft-caps or otherwise post-processes its logits fails it) and only while the head
is frozen; otherwise the loss is computed on the full logits as before, with a log line saying why.
"""

from __future__ import annotations

import logging
import weakref
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

#: ``model -> (decoder, head)`` when the split reproduced the model's logits, ``None`` when it did not.
_SPLITS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def head_split(model: nn.Module, kwargs: dict[str, Any]) -> tuple[nn.Module, nn.Linear] | None:
    """``(decoder, head)`` with ``model(**kwargs).logits == head(decoder(**kwargs).last_hidden_state)``, checked
    once per model on ``kwargs`` (the first batch; eval mode, no gradient); ``None`` where that does not hold."""
    if model in _SPLITS:
        return _SPLITS[model]
    split, why = _try_split(model, kwargs)
    if split is None:
        log.info("distillation on full logits for %s: %s", type(model).__name__, why)
    _SPLITS[model] = split
    return split


def _try_split(model: nn.Module, kwargs: dict[str, Any]) -> tuple[tuple[nn.Module, nn.Linear] | None, str]:
    get_decoder = getattr(model, "get_decoder", None)
    get_head = getattr(model, "get_output_embeddings", None)
    decoder = get_decoder() if callable(get_decoder) else None
    head = get_head() if callable(get_head) else None
    if not isinstance(decoder, nn.Module) or decoder is model or type(head) is not nn.Linear:
        return None, "no Hugging Face decoder / nn.Linear head split"
    modes = [(m, m.training) for m in model.modules()]  # restored module by module: some may be in eval mode
    model.eval()
    try:
        with torch.no_grad():
            reference = model(**kwargs, logits_to_keep=1).logits[:, -1].float()
            hidden = decoder(**kwargs).last_hidden_state[:, -1]
            mine = head(hidden).float()
    except (TypeError, AttributeError) as error:  # no logits_to_keep / last_hidden_state
        return None, f"the split could not be checked ({error})"
    finally:
        for module, training in modes:
            module.training = training
    scale = reference.abs().max().clamp_min(1.0)
    if reference.shape != mine.shape or not bool((reference - mine).abs().max() <= 1e-3 * scale):
        return None, "head(decoder(x)) differs from the model's logits (scaled or soft-capped logits?)"
    return (decoder, head), ""


def _forward_kwargs(batch: dict) -> dict[str, Any]:
    """The keyword arguments of one model (or decoder) forward over ``batch``, without a KV cache."""
    return {"input_ids": batch["input_ids"], "attention_mask": batch.get("attention_mask"), "use_cache": False}


def _rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``(a * b).sum(-1)`` for 2-D ``a``, ``b`` without the product's temporary."""
    return torch.bmm(a[:, None, :], b[:, :, None]).reshape(a.shape[0])


class _ChunkedDistillation(torch.autograd.Function):
    """``(Σ_r kl_w[r] KL_r, Σ_r ce_w[r] NLL_r)`` over rows ``r`` of ``hidden`` (see the module docstring)."""

    @staticmethod
    def forward(ctx, hidden, teacher_hidden, weight, bias, teacher_weight, teacher_bias, labels, kl_w, ce_w,
                temperature: float, dtype: torch.dtype, chunk: int):
        head = weight.to(dtype), None if bias is None else bias.to(dtype)
        teacher_head = teacher_weight.to(dtype), None if teacher_bias is None else teacher_bias.to(dtype)
        distill = hidden.new_zeros((), dtype=torch.float32)
        task = hidden.new_zeros((), dtype=torch.float32)
        grad_distill = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            z = F.linear(hidden[rows].to(dtype), *head).float()
            z_t = F.linear(teacher_hidden[rows].to(dtype), *teacher_head).float()
            if temperature == 1.0:
                log_p = torch.log_softmax(z, -1)
                nll = -log_p.gather(-1, labels[rows, None])
            else:
                nll = -torch.log_softmax(z, -1).gather(-1, labels[rows, None])
                log_p = torch.log_softmax(z.div_(temperature), -1)
                z_t.div_(temperature)
            log_p_t = torch.log_softmax(z_t, -1)
            p_t = log_p_t.exp()
            # KL_r = Σ_v p_t (log p_t − log p), as two batched dot products (no vocabulary-sized temporary)
            kl = _rowdot(p_t, log_p_t) - _rowdot(p_t, log_p)
            distill += (kl * kl_w[rows]).sum()
            task += (nll.squeeze(-1) * ce_w[rows]).sum()
            g = log_p.exp_().sub_(p_t).mul_((kl_w[rows] / temperature)[:, None])
            grad_distill[rows] = (g.to(dtype) @ head[0]).to(hidden.dtype)
        ctx.save_for_backward(hidden, weight, bias, labels, ce_w, grad_distill)
        ctx.dtype, ctx.chunk = dtype, chunk
        return distill, task

    @staticmethod
    def backward(ctx, grad_distill_out, grad_task_out):
        hidden, weight, bias, labels, ce_w, grad_distill = ctx.saved_tensors
        grad = grad_distill * grad_distill_out.to(grad_distill.dtype)
        if bool(grad_task_out != 0):
            head = weight.to(ctx.dtype), None if bias is None else bias.to(ctx.dtype)
            for start in range(0, hidden.shape[0], ctx.chunk):
                rows = slice(start, start + ctx.chunk)
                g = torch.softmax(F.linear(hidden[rows].to(ctx.dtype), *head).float(), -1)
                g[torch.arange(g.shape[0], device=g.device), labels[rows]] -= 1.0
                g.mul_((ce_w[rows] * grad_task_out)[:, None])
                grad[rows] += (g.to(ctx.dtype) @ head[0]).to(grad.dtype)
        return grad, *([None] * 11)


def chunked_distillation_loss(student: nn.Module, teacher: nn.Module, batch: dict, temperature: float = 1.0,
                              chunk: int | None = None) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``CausalLMSpec.distillation_loss`` with the head and both losses in chunks of ``chunk`` positions
    (default: 2²² logits per chunk on a CPU, whose float32 temporaries then stay under glibc's 32 MB mmap
    threshold -- larger chunks were slower there -- and 2²⁵ on an accelerator); ``None`` where a model's
    decoder / head split does not hold or the head is trained (the caller then uses the full logits)."""
    kwargs = _forward_kwargs(batch)
    splits = head_split(student, kwargs), head_split(teacher, kwargs)
    if splits[0] is None or splits[1] is None:
        return None
    (decoder, head), (teacher_decoder, teacher_head) = splits
    if any(p.requires_grad for p in head.parameters()):
        return None
    device = batch["input_ids"].device
    dtype = (torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type)
             else head.weight.dtype)
    with torch.no_grad():
        teacher_hidden = teacher_decoder(**kwargs).last_hidden_state[:, :-1]
    hidden = decoder(**kwargs).last_hidden_state[:, :-1]
    mask = batch.get("attention_mask")
    mask = torch.ones(hidden.shape[:2], device=device) if mask is None else mask[:, 1:].float()
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    valid = labels != -100
    rows = ((mask != 0) | valid).reshape(-1).nonzero().squeeze(-1)
    kl_w = (mask * temperature**2 / mask.sum().clamp_min(1)).reshape(-1)[rows]
    ce_w = (valid.float() / valid.sum().clamp_min(1)).reshape(-1)[rows]
    labels = labels.reshape(-1)[rows].clamp_min(0)  # rows scored by the KL only: any index, weight 0
    width = hidden.shape[-1]
    chunk = chunk or max(16, (2**22 if device.type == "cpu" else 2**25) // head.out_features)
    with torch.autocast(device.type, enabled=False):
        return _ChunkedDistillation.apply(
            hidden.reshape(-1, width)[rows], teacher_hidden.reshape(-1, width)[rows], head.weight, head.bias,
            teacher_head.weight, teacher_head.bias, labels, kl_w, ce_w, float(temperature), dtype, chunk)


def full_logits_distillation_loss(student: nn.Module, teacher: nn.Module, batch: dict,
                                  temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """The same two losses from the models' full ``[batch, seq, vocab]`` logits (any causal LM)."""
    kwargs = _forward_kwargs(batch)
    with torch.no_grad():
        target = F.log_softmax(teacher(**kwargs).logits[:, :-1].float() / temperature, dim=-1)
    logits = student(**kwargs).logits[:, :-1].float()
    kl = (target.exp() * (target - F.log_softmax(logits / temperature, dim=-1))).sum(-1)  # [B, S-1]
    mask = batch.get("attention_mask")
    mask = torch.ones_like(kl) if mask is None else mask[:, 1:].to(kl.dtype)
    distill = (kl * mask).sum() / mask.sum().clamp_min(1) * temperature**2
    labels = batch.get("labels", batch["input_ids"])[:, 1:]
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100,
                          reduction="sum")
    return distill, nll / (labels != -100).sum().clamp_min(1)
