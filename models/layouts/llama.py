"""LLaMA-shaped decoders: LLaMA, Mistral, Ministral, Ministral 3, Qwen2, Qwen3, Granite, Granite-SWA, SmolLM3,
Seed-OSS, Ernie 4.5, Helium, Arcee, Apertus, Apertus 1.5, HunYuan, CWM, Nemotron, Jais 2, OLMo, NanoChat, HyperCLOVAX,
DiffLlama (and the language model of LLaVA / Idefics3).  Granite-SWA and CWM alternate sliding and full layers by
``layer_types``.  Nemotron and Jais 2 have LayerNorm (Nemotron's scales by ``1 + w``) and a plain ReLU² MLP;
Nemotron rotates half of each head (partial RoPE).
OLMo (1) has LayerNorms without weight or bias, and with ``clip_qkv`` clamps q, k and v after their projections:
then the latent KV cache, which rebuilds K/V without a clamp, is refused.  NanoChat's RMSNorms have no scale (one of
them also normalizes the embeddings before the first layer, which commutes with the stream rotation), its q/k norms
run after RoPE, its RoPE turns the other way (its own ``rotate_half``: ``(x2, -x1)``), and its MLP is plain
(``fc2(relu²(fc1(x)))``).  HyperCLOVAX is Granite's block (the same scalars) with, when ``use_post_norm``, an RMSNorm
on each sublayer's output before the residual add (``post_norm1`` / ``post_norm2``, Peri-LN): rotated at the readers.
DiffLlama's projections, norms and MLP are LLaMA's; its differential attention has no latent K/V rebuild.

``model.layers.i``: ``input_layernorm`` -> ``self_attn.{q,k,v}_proj`` (+ per-head ``q_norm``/``k_norm`` on
Qwen3) -> ``o_proj`` -> stream; ``post_attention_layernorm`` -> ``mlp.{gate,up}_proj`` -> ``down_proj`` ->
stream.  RMSNorm scales by ``w``; rotary ``model.rotary_emb(x, positions)``; sliding windows per layer
(Qwen2/Qwen3/Ministral ``layer_types``) or on every layer (Mistral ``sliding_window``).  Granite's scalars
(``embedding_multiplier`` on the embeddings, ``residual_multiplier`` on each writer's output before the residual
add, ``attention_multiplier`` as the attention's ``scaling``, ``logits_scaling`` dividing the logits) stay in the
model's own code: a scalar commutes with the rotations and factorizations here, and the latent cache uses the
attention module's ``scaling``.  SmolLM3's NoPE layers (``no_rope_layers[i] == 0``: the attention's ``use_rope``
is false) rotate neither queries nor keys; their spec has ``nope=True`` and no rotary module.  Ernie 4.5 and Helium
rotate interleaved channel pairs; their spec carries the family's own ``apply_rotary_pos_emb`` (``rope``), which
the latent KV cache calls instead of its rotate-half RoPE.  Arcee and Apertus have a plain MLP
(``down_proj(act(up_proj(x)))``, ReLU² / xIELU); Apertus names its norms ``attention_layernorm`` and
``feedforward_layernorm``.  HunYuan normalizes q and k per head *after* RoPE (``query_layernorm``,
``key_layernorm``).  Ministral 3 scales its rotated queries by position
beyond its original context (:func:`query_scale`), which the latent KV cache applies too.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

from torch import nn

from compression.layout import MLP, Attention, Block, ModelLayout, Norm
from models.layouts.common import decoder_of, eager_of, join, layer_norm, plain_mlp, rms, rope_of, sliding_kwargs

CONFIGS = ("LlamaConfig", "MistralConfig", "Qwen2Config", "Qwen3Config", "GraniteConfig", "MinistralConfig",
           "SmolLM3Config", "SeedOssConfig", "Ernie4_5Config", "HeliumConfig", "Ministral3Config", "ArceeConfig",
           "ApertusConfig", "HunYuanDenseV1Config", "Qwen2VLTextConfig", "Qwen2_5_VLTextConfig", "Qwen3VLTextConfig",
           "GraniteSWAConfig", "CwmConfig", "NemotronConfig", "Jais2Config", "Apertus1p5TextConfig", "StableLmConfig",
           "OlmoConfig", "NanoChatConfig", "HyperCLOVAXConfig", "DiffLlamaConfig")
# text decoders of VLMs with multimodal RoPE (3-D positions: time, height, width), whose keys the latent KV cache
# does not rebuild
MROPE = {"Qwen2VLTextConfig", "Qwen2_5_VLTextConfig", "Qwen3VLTextConfig"}
# families whose attention the latent K/V rebuild does not implement, and why
LATENT_REASONS = {"DiffLlamaConfig": "differential attention: two softmax maps over the same q and k, subtracted with "
                                     "learned λ and group-normalized; the latent rebuild computes one softmax"}
MROPE_REASON = ("multimodal RoPE rotates q and k by 3-D positions (time, height, width) computed from the image "
                "grid; the latent K/V rebuild implements 1-D RoPE only")
# families whose rotary module takes the layer type (a different θ per type): Gemma 3, OLMo 3
ROTARY_BY_LAYER_TYPE = ("Gemma3TextConfig", "Olmo3Config")
# families whose RoPE is not LLaMA's rotate-half with full-width cos/sin: interleaved channel pairs
# (``x[..., 0::2]``, ``x[..., 1::2]``), or GPT-OSS's half-width cos/sin; their own function is used
FAMILY_ROPE = ("Ernie4_5Config", "HeliumConfig", "GlmConfig", "Glm4Config", "CohereConfig", "Cohere2Config",
               "GptOssConfig", "Ernie4_5_MoeConfig", "NanoChatConfig")
# families whose q_norm / k_norm normalize the whole projection, before the heads are split
WHOLE_QK_NORM = ("Olmo2Config", "Olmo3Config", "OlmoeConfig", "MiniMaxM2Config", "FlexOlmoConfig")
# families whose MLP is plain (``down(act(up(x)))``, no gate), and those that name its parts otherwise than
# ``up_proj`` / ``act_fn`` / ``down_proj``: (input projection, activation, output projection)
PLAIN_MLP = ("ArceeConfig", "ApertusConfig", "NemotronConfig", "Jais2Config", "Apertus1p5TextConfig", "NanoChatConfig")
PLAIN_MLP_NAMES = {"NanoChatConfig": ("fc1", "activation_fn", "fc2")}
# q/k norms not named ``q_norm`` / ``k_norm``, and families that apply them after RoPE
QK_NORM_NAMES = {"HunYuanDenseV1Config": ("query_layernorm", "key_layernorm"),
                 "HunYuanMoEV1Config": ("query_layernorm", "key_layernorm")}
QK_NORM_AFTER_ROPE = ("HunYuanDenseV1Config", "HunYuanMoEV1Config", "NanoChatConfig")
# families whose full-attention layers use no positions (only their sliding layers are rotary)
NOPE_FULL_LAYERS = ("FlintConfig",)
# post-norms on the attention's and the MLP's outputs before the residual add (HyperCLOVAX's Peri-LN, when
# ``use_post_norm``: ``nn.Identity`` otherwise)
OUT_NORMS = {"HyperCLOVAXConfig": ("post_norm1", "post_norm2")}
# families with LayerNorm (mean subtracted, biases) where LLaMA has RMSNorm
LAYERNORM = ("PhimoeConfig", "NemotronConfig", "Jais2Config", "StableLmConfig", "OlmoConfig")
# reader norms not named ``input_layernorm`` / ``post_attention_layernorm``
NORM_NAMES = {"ApertusConfig": ("attention_layernorm", "feedforward_layernorm"),
              "Apertus1p5TextConfig": ("attention_layernorm", "feedforward_layernorm")}
# where each family's attention forward takes the ``sliding_window`` it passes to the attention function
WINDOW_SOURCE = {"MistralConfig": "config", "MixtralConfig": "config", "Starcoder2Config": "config",
                 "Ministral3Config": "config", "OlmoeConfig": "config",
                 "Qwen2Config": "module", "Qwen3Config": "module", "Qwen3MoeConfig": "module",
                 "MinistralConfig": "module", "SmolLM3Config": "module", "Gemma3TextConfig": "module",
                 "Gemma2Config": "module", "Olmo3Config": "module", "Cohere2Config": "module",
                 "GptOssConfig": "module", "Dots1Config": "module", "VaultGemmaConfig": "module",
                 "GraniteSWAConfig": "module", "CwmConfig": "module", "FlintConfig": "module"}


def query_scale(attn: nn.Module, config) -> Callable | None:
    """Ministral 3 multiplies its rotated queries by ``1 + β log(1 + ⌊p / P⌋)`` (``llama_4_scaling_beta``, the
    original context ``P``): the family's own function with the config's numbers; ``None`` for the others."""
    if type(config).__name__ != "Ministral3Config":
        return None
    fn = sys.modules[type(attn).__module__].get_llama_4_attn_scale
    rope = config.rope_parameters
    return functools.partial(fn, beta=rope.get("llama_4_scaling_beta"),
                             max_position_embeddings=rope.get("original_max_position_embeddings"))


def attention(attn: nn.Module, path: str, config, rotary: str, rotary_args: tuple = (), offset: float = 0.0
              ) -> Attention:
    name = type(config).__name__
    nope = not getattr(attn, "use_rope", True)  # SmolLM3: q/k of its NoPE layers are not rotated
    nope |= name in NOPE_FULL_LAYERS and attn.sliding_window is None
    qn, kn = QK_NORM_NAMES.get(name, ("q_norm", "k_norm"))
    q_norm = rms(join(path, qn), offset) if hasattr(attn, qn) else None
    k_norm = rms(join(path, kn), offset) if hasattr(attn, kn) else None
    return Attention(
        path=path, o=join(path, "o_proj"), q=join(path, "q_proj"), k=join(path, "k_proj"), v=join(path, "v_proj"),
        heads=config.num_attention_heads, kv_heads=config.num_key_value_heads, head_dim=attn.head_dim,
        q_norm=q_norm, k_norm=k_norm, rotary=None if nope else rotary, rotary_args=rotary_args, nope=nope,
        rope=rope_of(attn) if name in FAMILY_ROPE else None,
        query_scale=query_scale(attn, config), qk_norm_whole=name in WHOLE_QK_NORM,
        qk_norm_after_rope=name in QK_NORM_AFTER_ROPE,
        attention_kwargs=sliding_kwargs(attn, config, WINDOW_SOURCE.get(type(config).__name__)),
        eager=eager_of(attn))


def gated_mlp(path: str, act: str = "act_fn") -> MLP:
    """LLaMA's ``down_proj(act(gate_proj(x)) * up_proj(x))``; ``act``: the activation's attribute name (Llama 4:
    ``activation_fn``)."""
    return MLP(path, "gated", (join(path, "gate_proj"), join(path, "up_proj")), join(path, "down_proj"),
               names=(("gate", "gate_proj"), ("up", "up_proj"), ("act", act), ("down", "down_proj")))


def fused_gated_mlp(path: str, gate_up: str = "gate_up_proj", act: str = "activation_fn",
                    down: str = "down_proj") -> MLP:
    """``down(act(g) * u)`` with ``g, u = chunk(gate_up(x))`` (Phi-3, GLM; Granite-MoE-Shared's shared expert:
    ``input_linear`` / ``activation`` / ``output_linear``)."""
    return MLP(path, "gated_fused", (join(path, gate_up),), join(path, down),
               names=(("gate_up", gate_up), ("act", act), ("down", down)))


def decoder_layers(model: nn.Module, base: str, offset: float = 0.0
                   ) -> tuple[object, list[tuple[str, nn.Module, Attention]]]:
    """``(config, [(layer path, layer, attention spec)])`` of the LLaMA-shaped decoder at ``base``
    (``base.layers.i.self_attn``, rotary ``base.rotary_emb``, called with the layer's type in the families of
    :data:`ROTARY_BY_LAYER_TYPE`); ``offset``: the q/k norms' scale offset (Gemma: 1)."""
    config, layers = decoder_of(model, base)
    rotary = join(base, "rotary_emb")
    by_type = type(config).__name__ in ROTARY_BY_LAYER_TYPE
    out = []
    for i, (p, layer) in enumerate(layers):
        args = (config.layer_types[i],) if by_type else ()
        out.append((p, layer, attention(layer.self_attn, join(p, "self_attn"), config, rotary, args, offset)))
    return config, out


def decoder_layout(model: nn.Module, family: str, config, base: str, head: str, blocks, final_norm: Norm,
                   **extra) -> ModelLayout:
    """The :class:`ModelLayout` of a LLaMA-shaped decoder at ``base`` (token embedding ``base.embed_tokens``)."""
    return ModelLayout(family=family, model_class=type(model).__name__, hidden=config.hidden_size,
                       token_embedding=join(base, "embed_tokens"), blocks=tuple(blocks), final_norm=final_norm,
                       head=head, **extra)


def build(model: nn.Module, base: str = "model", head: str = "lm_head", mlp=None) -> ModelLayout:
    """``base``: the decoder (``model`` of a causal LM, ``model.language_model`` of a VLM); ``mlp(layer, path)``
    describes a block's MLP (default: the gated LLaMA MLP, or the plain one of Arcee / Apertus)."""
    config, layers = decoder_layers(model, base)
    name = type(config).__name__
    plain_names = PLAIN_MLP_NAMES.get(name, ("up_proj", "act_fn", "down_proj"))
    mlp = mlp or (lambda la, q: plain_mlp(q, *plain_names) if name in PLAIN_MLP else gated_mlp(q))
    attn_norm, mlp_norm = NORM_NAMES.get(name, ("input_layernorm", "post_attention_layernorm"))
    norm = layer_norm if name in LAYERNORM else rms
    blocks = []
    for p, layer, attn in layers:
        # StableLM's parallel residual (``use_parallel_residual``): attention and MLP both read ``input_layernorm``
        parallel = bool(getattr(layer, "use_parallel_residual", False))
        attn_out, mlp_out = [None if isinstance(getattr(layer, n), nn.Identity) else norm(join(p, n))
                             for n in OUT_NORMS.get(name, ())] or (None, None)
        blocks.append(Block(path=p, attn=attn, mlp=mlp(layer, join(p, "mlp")), attn_norm=norm(join(p, attn_norm)),
                            mlp_norm=None if parallel else norm(join(p, mlp_norm)), parallel=parallel,
                            attn_out_norm=attn_out, mlp_out_norm=mlp_out))
    unsupported = (("latent_cache", MROPE_REASON),) if name in MROPE else ()
    if name in LATENT_REASONS:
        unsupported += (("latent_cache", LATENT_REASONS[name]),)
    if getattr(config, "clip_qkv", None) is not None:
        unsupported += (("latent_cache", f"clip_qkv: {config.clip_qkv} clamps q, k and v after their projections; "
                         "the latent K/V rebuild (and its absorbed value projection) has no clamp"),)
    return decoder_layout(model, "llama", config, base, head, blocks, norm(join(base, "norm")), unsupported=unsupported)
