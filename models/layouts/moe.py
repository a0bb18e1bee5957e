"""Mixture-of-experts LLaMA-shaped decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and Phi-3.5-MoE.

Attention as LLaMA.  The MLP is ``mlp.gate`` (router, ``n x E`` weight, kept dense by default) choosing
top-k ``mlp.experts``, whose weights are 3-D tensors ``gate_up_proj (n x 2I x E)`` and ``down_proj
(n x E x I)`` (or per-expert linears once linearized by :func:`compression.forms.linearize_experts_`).  Qwen2-MoE
adds a gated ``shared_expert`` MLP scaled by ``sigmoid(shared_expert_gate(x))``; its layers listed in
``mlp_only_layers`` (or off the ``decoder_sparse_step``) have a plain gated MLP.  Qwen3-MoE is Qwen2-MoE without
the shared expert, with Qwen3's per-head ``q_norm``/``k_norm`` and its window passed by the attention module; OLMoE
is the same MoE with OLMo 2's whole-projection q/k norms; Phi-3.5-MoE (``PhimoeForCausalLM``) has LayerNorm instead
of RMSNorm (so it is rotated at the readers) and its router, an ``nn.Linear`` subclass returning the routing, at
``mlp.router`` (not a target: only plain linears are).
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Experts
from models.layouts import llama
from models.layouts.common import join

CONFIGS = ("MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig", "OlmoeConfig", "PhimoeConfig")


def experts_readers(experts: nn.Module, path: str, name: str) -> tuple[str, ...]:
    """Per-expert linears when linearized, else nothing (the 3-D tensor is rotated through the Experts spec)."""
    value = getattr(experts, name)
    return tuple(join(path, name, str(e)) for e in range(len(value))) if isinstance(value, nn.ModuleList) else ()


def moe_mlp(layer: nn.Module, path: str) -> MLP:
    mlp = layer.mlp
    if not hasattr(mlp, "experts"):
        return llama.gated_mlp(path)
    ep = join(path, "experts")
    experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn", count=mlp.experts.num_experts,
                      router=join(path, "gate" if hasattr(mlp, "gate") else "router"))
    readers = experts_readers(mlp.experts, ep, "gate_up_proj")
    shared = llama.gated_mlp(join(path, "shared_expert")) if hasattr(mlp, "shared_expert") else None
    shared_gate = join(path, "shared_expert_gate") if hasattr(mlp, "shared_expert_gate") else None
    return MLP(path, "moe", readers, None, experts=experts, shared=shared, shared_gate=shared_gate)


def build(model: nn.Module, base: str = "model", head: str = "lm_head"):
    layout = llama.build(model, base, head, mlp=moe_mlp)
    return type(layout)(**{**layout.__dict__, "family": "moe"})
