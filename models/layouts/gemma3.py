"""Gemma 3 text decoders (``Gemma3ForCausalLM``, e.g. Gemma-3-270M) and Gemma 2 (``Gemma2ForCausalLM``).

Differences from LLaMA that matter to compression: every RMSNorm scales by ``1 + w`` (``offset = 1``);
each block has four norms, ``input_layernorm`` -> attention -> ``post_attention_layernorm`` -> stream and
``pre_feedforward_layernorm`` -> MLP -> ``post_feedforward_layernorm`` -> stream, so the attention and MLP
outputs are normalized *before* they reach the stream (post-norms); per-head ``q_norm``/``k_norm``; the token
embedding is multiplied by ``√E``; sliding-window and full layers alternate (``config.layer_types``) and the
rotary module takes the layer type (``rotary_emb(x, positions, layer_type)``: different θ per type).
Because of the post-norms, :func:`compression.rotation.rotate_model_` rotates Gemma at the readers (online
after each reader norm, scales kept) instead of folding the scales and rotating the stream: folded, the tiny
scales of Gemma-3-270M's reader norms broke its weight quantization (docs/results/second_llm.md).

Gemma 2 has the same blocks without ``q_norm``/``k_norm``, one rotary table for every layer
(``rotary_emb(x, positions)``), and caps the attention scores (``softcap``, passed to the attention function
with the window; the latent KV cache applies it too).  Its final logit cap stays in the model's own forward.

Gemma 1 (``GemmaForCausalLM``) and VaultGemma have no post-norms: Gemma 1 is LLaMA's block (``input_layernorm``,
``post_attention_layernorm`` before the MLP) with Gemma's ``1 + w`` norms, GeGLU and √E embedding; VaultGemma is
Gemma 2's block without its two post-norms (``input_layernorm``, ``pre_feedforward_layernorm``), score caps and
sliding windows included.
"""

from __future__ import annotations

import dataclasses

from torch import nn

from compression.layout import Block, ModelLayout
from models.layouts.common import join, rms
from models.layouts.llama import decoder_layers, decoder_layout, gated_mlp

CONFIGS = ("Gemma3TextConfig", "Gemma2Config", "GemmaConfig", "VaultGemmaConfig")
POST_NORMS = ("Gemma3TextConfig", "Gemma2Config")  # Gemma 1 and VaultGemma write to the stream unnormalized
SOFTCAP = ("Gemma2Config", "VaultGemmaConfig")  # attention score caps


def build(model: nn.Module, base: str = "model", head: str = "lm_head") -> ModelLayout:
    config, layers = decoder_layers(model, base, offset=1.0)
    name = type(config).__name__
    post = name in POST_NORMS
    mlp_norm = "post_attention_layernorm" if name == "GemmaConfig" else "pre_feedforward_layernorm"
    blocks = []
    for p, layer, attn in layers:
        cap = getattr(layer.self_attn, "attn_logit_softcapping", None) if name in SOFTCAP else None
        if cap is not None:
            attn = dataclasses.replace(attn, attention_kwargs=(*attn.attention_kwargs, ("softcap", float(cap))))
        blocks.append(Block(
            path=p, attn=attn, mlp=gated_mlp(join(p, "mlp")),
            attn_norm=rms(join(p, "input_layernorm"), 1.0), mlp_norm=rms(join(p, mlp_norm), 1.0),
            attn_out_norm=rms(join(p, "post_attention_layernorm"), 1.0) if post else None,
            mlp_out_norm=rms(join(p, "post_feedforward_layernorm"), 1.0) if post else None))
    return decoder_layout(model, "gemma3", config, base, head, blocks, rms(join(base, "norm"), 1.0),
                          embedding_scale=float(model.get_submodule(base).embed_tokens.embed_scale))
