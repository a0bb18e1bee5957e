"""What a decoder-only transformer looks like, as plain data: the contract between ``models/`` and ``compression/``.

``compression/`` never names a module of a model family (no ``q_proj``, ``layers``,
``input_layernorm`` or ``LlamaAttention`` here or in the code that reads a layout).  A family's
layout (:mod:`models.layouts`, one module per family, resolved from the model's config class) says,
with full module names:

- the residual stream: what writes it (token and position embeddings, each block's attention and MLP
  output projections, a VLM's projector output and learned stream vectors) and what reads it (each
  block's q/k/v or fused qkv, the MLP's input projections, a MoE router, the output head);
- which norm feeds which readers and how it scales: ``rms`` (``x / rms(x) · (offset + w)``, Gemma's
  ``1 + w`` is ``offset = 1``) or ``layer`` (mean subtracted, plus a bias); post-norms that sit between a
  writer and the stream (Gemma's ``post_attention_layernorm`` / ``post_feedforward_layernorm``);
- q/k/v: separate projections or one fused projection with the output rows of q, k and v, head counts
  (GQA), per-head q/k norms, the rotary module and its per-layer type, the attention keyword
  arguments (sliding window) and the family's eager attention function;
- the MLP: gated or not, fused ``gate_up`` or not, experts (3-D tensors or per-expert linears), router.

Shapes follow ``nn.Linear``: a weight is ``out x in``; a reader's input dimension is the hidden size ``E``.
A feature a layout cannot support is listed in ``unsupported`` with the reason; :meth:`ModelLayout.require`
refuses it up front with the model class and the missing piece.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Norm:
    """A normalization module: ``rms``: ``y = x / rms(x) · (offset + w)``; ``layer``: ``y = (x - μ) / σ · w + b``."""

    path: str
    kind: str = "rms"
    offset: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in ("rms", "layer"):
            raise ValueError(f"norm kind must be 'rms' or 'layer', got {self.kind!r}")


@dataclass(frozen=True)
class Attention:
    """One attention block.  Either ``q``/``k``/``v`` (separate projections) or ``qkv`` (fused, with
    ``qkv_rows = (q_rows, k_rows, v_rows)``: the rows of the fused output that form q, k and v, each a
    tuple of ``(start, stop)`` ranges in head-major order), or ``inputs``: the linears reading the normed stream
    when they are no q/k/v triple (DeepSeek's multi-head latent attention: ``q_a_proj`` or ``q_proj``, and
    ``kv_a_proj_with_mqa``); they share their input, so they are one joint group, and the rest of the attention
    (``q_b_proj``, ``kv_b_proj``) reads its own latents."""

    path: str
    o: str
    heads: int
    kv_heads: int
    head_dim: int
    q: str | None = None
    k: str | None = None
    v: str | None = None
    qkv: str | None = None
    qkv_rows: tuple[tuple[tuple[int, int], ...], ...] | None = None
    q_norm: Norm | None = None
    k_norm: Norm | None = None
    rotary: str | None = None             # path of the rotary module: ``cos, sin = rotary(x, positions, *rotary_args)``
    rotary_args: tuple = ()
    attention_kwargs: tuple[tuple[str, object], ...] = ()   # e.g. (("sliding_window", 4096),)
    eager: Callable | None = None          # the family's eager attention function (fallback interface)
    nope: bool = False                     # no position rotation of q/k on this layer (SmolLM3's NoPE layers)
    rope: Callable | None = None           # the family's ``apply_rotary_pos_emb(q, k, cos, sin)`` where its RoPE is
    #                                        not LLaMA's rotate-half (interleaved pairs, GPT-OSS's half-width cos)
    query_scale: Callable | None = None    # position_ids [B, S] -> factor [B, 1, S, 1] on the rotated queries
    #                                        (Ministral 3's long-context scale)
    qk_norm_whole: bool = False            # q_norm / k_norm normalize the whole projection (all heads at once:
    #                                        OLMo 2 / 3), not each head (Qwen3, Gemma3)
    qk_norm_after_rope: bool = False       # q_norm / k_norm act on the rotated heads (HunYuan), not before RoPE
    inputs: tuple[str, ...] = ()           # the stream readers of an attention with no q/k/v triple (MLA)
    prescaled_queries: bool = False        # q is multiplied by the attention scale before the product, which then
    #                                        runs at scale 1 (OPT)

    def __post_init__(self) -> None:
        separate = None not in (self.q, self.k, self.v)
        if self.inputs:
            if separate or self.qkv is not None:
                raise ValueError(f"attention {self.path!r}: give inputs, or q/k/v, or one fused qkv")
        elif separate == (self.qkv is not None):
            raise ValueError(f"attention {self.path!r}: give q, k and v, or one fused qkv")
        if self.nope and self.rotary is not None:
            raise ValueError(f"attention {self.path!r}: a NoPE layer has no rotary module")
        if self.qkv is not None and (self.qkv_rows is None or len(self.qkv_rows) != 3):
            raise ValueError(f"attention {self.path!r}: a fused qkv needs qkv_rows for q, k and v")

    @property
    def fused(self) -> bool:
        return self.qkv is not None

    @property
    def readers(self) -> tuple[str, ...]:
        if self.inputs:
            return self.inputs
        return (self.qkv,) if self.fused else (self.q, self.k, self.v)

    @property
    def sliding_window(self) -> int | None:
        return dict(self.attention_kwargs).get("sliding_window")


@dataclass(frozen=True)
class Experts:
    """Mixture-of-experts weights: ``gate_up`` (``n x 2I x E``) and ``down`` (``n x E x I``) are either 3-D
    parameters of the module at ``path`` or, once linearized, ``nn.ModuleList`` of per-expert linears under the
    same names; the MLP output of expert ``e`` is ``down_e(act(gate) * up)`` with ``gate, up = chunk(gate_up_e(x))``."""

    path: str
    gate_up: str
    down: str
    act: str
    count: int
    router: str                # module with an ``(n x E)`` ``weight`` reading the stream; kept dense by default
    form: str = "mixtral"      # "gpt_oss": stored as ``x W + b`` with biases, interleaved gate/up, clamped SwiGLU;
    #                            "llama4": stored as ``x W``, inputs already scaled by the routing; "dbrx": flat
    #                            ``mlp.w1`` / ``mlp.v1`` / ``mlp.w2`` (``E·I x n``), down used as ``h w2``


@dataclass(frozen=True)
class MLP:
    """``kind``: ``gated`` (``down(act(gate(x)) * up(x))``), ``gated_fused`` (``gate, up = chunk(gate_up(x))``),
    ``plain`` (``down(act(fc(x)))``) or ``moe`` (experts, optional shared gated MLP and its sigmoid gate).

    ``names`` are the attribute names inside ``path`` (``gate``, ``up``, ``gate_up``, ``fc``, ``act``, ``down``)
    used to run the MLP with an online Hadamard before ``down``.
    """

    path: str
    kind: str
    readers: tuple[str, ...]          # linears whose input is the normed stream
    writer: str | None                # the projection whose output goes to the stream (None for moe)
    names: tuple[tuple[str, str], ...] = ()
    experts: Experts | None = None
    shared: MLP | None = None
    shared_gate: str | None = None    # (1 x E) linear reading the stream

    def __post_init__(self) -> None:
        if self.kind not in ("gated", "gated_fused", "plain", "moe"):
            raise ValueError(f"MLP kind must be gated, gated_fused, plain or moe, got {self.kind!r}")

    def name(self, role: str) -> str:
        return dict(self.names)[role]


@dataclass(frozen=True)
class Block:
    """One decoder block.  ``mlp_norm=None``: the MLP reads ``attn_norm``'s output (Falcon's parallel block);
    ``parallel``: the MLP reads the block input, not the stream after attention (GPT-NeoX, Falcon).
    ``attn_out_norm`` / ``mlp_out_norm``: norms between a writer and the stream (Gemma's post-norms).
    ``attn_norm=None`` (and ``mlp_norm=None``, not parallel): no reader norms, the attention and the MLP read
    the raw stream (OLMo 2 / 3, whose norms are all post-norms)."""

    path: str
    attn: Attention
    mlp: MLP
    attn_norm: Norm | None
    mlp_norm: Norm | None
    attn_out_norm: Norm | None = None
    mlp_out_norm: Norm | None = None
    parallel: bool = False


@dataclass(frozen=True)
class ModelLayout:
    """A decoder's layout (see the module docstring); every path is a full module (or parameter) name."""

    family: str
    model_class: str
    hidden: int
    token_embedding: str               # nn.Embedding module (its weight may be tied to ``head``)
    blocks: tuple[Block, ...]
    final_norm: Norm
    head: str
    position_embeddings: tuple[str, ...] = ()   # other embedding modules adding to the stream (learned positions)
    embedding_scale: float = 1.0                # the token embedding's output is multiplied by this (Gemma: √E)
    writers: tuple[str, ...] = ()               # other linears writing the stream (a VLM projector's output)
    stream_vectors: tuple[str, ...] = ()        # learned vectors placed in the stream (LLaVA-NeXT image_newline)
    extra_joint_groups: tuple[tuple[str, tuple[str, str, str]], ...] = ()  # a VLM vision tower's attentions
    unsupported: tuple[tuple[str, str], ...] = field(default_factory=tuple)

    def require(self, feature: str) -> None:
        """Refuse ``feature`` (``rotation``, ``latent_cache``, ...) up front when the family cannot support it."""
        reason = dict(self.unsupported).get(feature)
        if reason is not None:
            raise NotImplementedError(f"{self.model_class} ({self.family} layout): {feature} is not supported: "
                                      f"{reason}")

    def supports(self, feature: str) -> bool:
        return feature not in dict(self.unsupported)

    def joint_groups(self) -> dict[str, list[str]]:
        """``attention path -> [q, k, v paths]`` for every attention with separate projections (fused ones
        need no group: factorizing the fused matrix is the joint factorization)."""
        groups = {b.attn.path: list(b.attn.readers) for b in self.blocks if not b.attn.fused}
        groups.update({path: list(members) for path, members in self.extra_joint_groups})
        return groups

    def routers(self) -> list[str]:
        """The MoE routers' paths.  Kept dense and in float by default: a changed routing sends tokens to other
        experts, an error no whitening sees."""
        return [b.mlp.experts.router for b in self.blocks if b.mlp.experts is not None]

    def attention(self, path: str) -> Attention:
        for block in self.blocks:
            if block.attn.path == path:
                return block.attn
        raise KeyError(f"{self.model_class}: no attention at {path!r}")


def row_ranges(sizes: list[int]) -> tuple[tuple[tuple[int, int], ...], ...]:
    """Contiguous ``[q | k | v]`` rows: ``sizes = [m_q, m_k, m_v]`` -> one range each."""
    out, start = [], 0
    for size in sizes:
        out.append(((start, start + size),))
        start += size
    return tuple(out)


def rows_index(ranges: tuple[tuple[int, int], ...]) -> list[int]:
    return [i for start, stop in ranges for i in range(start, stop)]


__all__ = ["Attention", "Block", "Experts", "MLP", "ModelLayout", "Norm", "row_ranges", "rows_index"]
