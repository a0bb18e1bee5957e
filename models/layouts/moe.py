"""Mixture-of-experts LLaMA-shaped decoders: Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, Phi-3.5-MoE, Granite-MoE and
Granite-MoE-Shared.

Attention as LLaMA.  The MLP is ``mlp.gate`` (router, ``n x E`` weight, kept dense by default) choosing
top-k ``mlp.experts``, whose weights are 3-D tensors ``gate_up_proj (n x 2I x E)`` and ``down_proj
(n x E x I)`` (or per-expert linears once linearized by :func:`compression.forms.linearize_experts_`).  Qwen2-MoE
adds a gated ``shared_expert`` MLP scaled by ``sigmoid(shared_expert_gate(x))``; its layers listed in
``mlp_only_layers`` (or off the ``decoder_sparse_step``) have a plain gated MLP.  Qwen3-MoE is Qwen2-MoE without
the shared expert, with Qwen3's per-head ``q_norm``/``k_norm`` and its window passed by the attention module; OLMoE
is the same MoE with OLMo 2's whole-projection q/k norms; Phi-3.5-MoE (``PhimoeForCausalLM``) has LayerNorm instead
of RMSNorm (so it is rotated at the readers) and its router, an ``nn.Linear`` subclass returning the routing, at
``mlp.router`` (not a target: only plain linears are).  Granite-MoE keeps the same experts and router at
``block_sparse_moe`` (its multipliers stay in its own code); Granite-MoE-Shared adds a shared expert beside it,
``shared_mlp`` (``input_linear`` -> chunk into gate and up -> ``output_linear``), reading the same normed stream and
added to the MoE's output.  GLM-4.5 (``Glm4MoeConfig``), dots.llm1 and Ernie 4.5 MoE route with a score
correction bias and add always-on ``shared_experts`` (a gated MLP, no gate of its own); GLM-4.5 and MiniMax-M2
rotate the leading channels of each head only (partial rotary), MiniMax-M2 normalizes the whole q and k
projections, Ernie 4.5 MoE rotates interleaved channel pairs (the family's own RoPE function).  HunYuan-MoE's
router is an ``nn.Linear`` (``mlp.gate.wg``), its always-on expert ``mlp.shared_mlp``, its q/k norms act after
RoPE as in dense HunYuan.  Routers are left out of the default targets and of quantization
(:meth:`compression.layout.ModelLayout.routers`).
The first ``first_k_dense_replace`` layers of GLM-4.5 and dots.llm1 have a dense gated MLP.  Flint is Qwen2-MoE's
block with an always-on, ungated ``shared_expert``, per-head q/k norms, GPT-OSS-style attention sinks, and RoPE on its
sliding layers only: its full-attention layers use no positions (``NOPE_FULL_LAYERS`` in :mod:`models.layouts.llama`).
"""

from __future__ import annotations

from torch import nn

from compression.layout import MLP, Experts
from models.layouts import llama
from models.layouts.common import join

CONFIGS = ("MixtralConfig", "Qwen2MoeConfig", "Qwen3MoeConfig", "OlmoeConfig", "PhimoeConfig", "GraniteMoeConfig",
           "GraniteMoeSharedConfig", "Glm4MoeConfig", "MiniMaxM2Config", "Ernie4_5_MoeConfig", "Dots1Config",
           "HunYuanMoEV1Config", "FlintConfig")


def experts_readers(experts: nn.Module, path: str, name: str) -> tuple[str, ...]:
    """Per-expert linears when linearized, else nothing (the 3-D tensor is rotated through the Experts spec; DBRX's
    flat weights, which are not named ``name``, are linearized first)."""
    value = getattr(experts, name, None)
    return tuple(join(path, name, str(e)) for e in range(len(value))) if isinstance(value, nn.ModuleList) else ()


def _granite_shared(layer: nn.Module, block: str) -> MLP | None:
    if getattr(layer, "shared_mlp", None) is None:
        return None
    return llama.fused_gated_mlp(join(block, "shared_mlp"), "input_linear", "activation", "output_linear")


def moe_mlp(layer: nn.Module, path: str) -> MLP:
    block, _, name = path.rpartition(".")
    if not hasattr(layer, name) and hasattr(layer, "block_sparse_moe"):  # Granite-MoE
        name = "block_sparse_moe"
        path = join(block, name)
    mlp = getattr(layer, name)
    if not hasattr(mlp, "experts"):
        return llama.gated_mlp(path)
    ep = join(path, "experts")
    router = join(path, "gate" if hasattr(mlp, "gate") else "router")
    if hasattr(getattr(mlp, "gate", None), "wg"):  # HunYuan-MoE: an nn.Linear inside its gate module
        router = join(router, "wg")
    experts = Experts(path=ep, gate_up="gate_up_proj", down="down_proj", act="act_fn", count=mlp.experts.num_experts,
                      router=router)
    readers = experts_readers(mlp.experts, ep, "gate_up_proj")
    name = next((n for n in ("shared_expert", "shared_experts", "shared_mlp") if hasattr(mlp, n)), None)
    if name is not None:  # Qwen2-MoE's gated one, or always-on ones
        shared = llama.gated_mlp(join(path, name))
    else:
        shared = _granite_shared(layer, block)
    shared_gate = join(path, "shared_expert_gate") if hasattr(mlp, "shared_expert_gate") else None
    return MLP(path, "moe", readers, None, experts=experts, shared=shared, shared_gate=shared_gate)


def build(model: nn.Module, base: str = "model", head: str = "lm_head"):
    layout = llama.build(model, base, head, mlp=moe_mlp)
    return type(layout)(**{**layout.__dict__, "family": "moe"})
