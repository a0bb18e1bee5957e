"""Joint QKV factorization (QSVD): one shared down projection, three up projections.

The query, key and value projections of an attention block read the same normalized hidden
state ``x (E)``.  Stack their weights along the outputs,

    W = [W_q; W_k; W_v]            (m_q + m_k + m_v) x E      (GQA: m_k = m_v = kv_heads · head_dim)

and factorize ``W`` once in the method's transformed space (``W T = U Σ Vᵀ``, T from the shared
q/k/v statistics: ``I`` for ``svd``, ``diag(s^α)`` for ``asvd``, a Gram square root for
``svd_llm`` / ``svd_llm_v2``).  Keeping ``r`` triplets gives

    z = D x,  D = Σ_r^β V_rᵀ T⁻¹  (r x E, shared)           q = U_q z,  k = U_k z,  v = U_v z,
    [U_q; U_k; U_v] = U_r Σ_r^(1-β)

so ``z`` (r numbers per token) is everything the block needs to rebuild K and V: it is the
latent KV cache (:mod:`compression.latent_cache`).

Rank budget (weights of the three projections, biases aside):

    dense                     E (m_q + m_k + m_v)
    per-matrix SVD            r_q (E + m_q) + r_k (E + m_k) + r_v (E + m_v)
    joint                     r (E + m_q + m_k + m_v)

so a joint rank ``r`` saves weights only while ``r < E Σm / (E + Σm)``.  For multi-head
attention (``m_q = m_k = m_v = E``) the joint cost is ``4 r E`` against ``3 E²`` and
``R1 = 4r / (3E)``; the KV cache is ``r`` instead of ``2E`` per token, ``R2 = r / (2E)``.
With GQA (``m_k = m_v = g``): ``R1 = r (E + m_q + 2g) / (E (m_q + 2g))`` and ``R2 = r / (2g)``;
for SmolLM2-135M (E = m_q = 576, g = 192) ``R1 = 1536 r / 552960 = r / 360`` and ``R2 = r / 384``,
so the latent is smaller than the K/V cache only for ``r < 384``.  At equal parameters
with per-matrix SVD at removal ratio ρ the joint rank is ``floor((1-ρ) E Σm / (E + Σm))``.

Module layout (state-dict keys of one block, the shared factor stored once):
``self_attn.qkv_latent.down.weight`` (r x E), ``self_attn.{q,k,v}_proj.up.weight`` (m x r)
[+ ``.up.bias``].  :class:`JointProjection` keeps a plain (non-module) reference to the shared
:class:`JointLatent`, so HF attention still calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``;
the latent is computed once per input tensor (identity + version check) and reused.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from compression.finite import all_finite
from compression.lowrank import linear_num_parameters, merged_linear
from compression.memo import InputMemo
from compression.methods import Method, thin_svd

log = logging.getLogger(__name__)

LATENT_NAME = "qkv_latent"


class FactorLinear(nn.Linear):
    """A factor of a joint group: plain ``nn.Linear`` maths under its own type, so the default
    target filter (plain ``nn.Linear`` only) never re-compresses it."""


class JointLatent(nn.Module):
    """``z = down(x)``: ``[..., E] -> [..., r]``, computed once per distinct input tensor.

    ``uses``: how many projections read each latent (q/k/v: 3); the memo lets go of ``z`` after the last
    of them, so no latent outlives its attention call (``tokens x r`` numbers per layer, and under
    autograd the reference kept it past the backward).  ``None``: kept until the next input.
    """

    def __init__(self, in_features: int, rank: int, device=None, dtype=None, uses: int | None = None) -> None:
        super().__init__()
        self.in_features, self.rank = in_features, rank
        self.down = FactorLinear(in_features, rank, bias=False, device=device, dtype=dtype)
        # inference-mode tensors (Trainer.test/validate) carry no version counter; q/k/v of one
        # attention call read the same unmodified tensor, so identity alone identifies it there
        self.memo = InputMemo(uses, "joint latent")

    @property
    def uses(self) -> int | None:
        return self.memo.uses

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = self.memo.get(x)
        return z if z is not None else self.memo.put(x, self.down(x))

    def clear(self) -> None:
        """Forget the memoized latent (it is also replaced on the next new input)."""
        self.memo.clear()

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, rank={self.rank}"


class JointProjection(nn.Module):
    """One of q/k/v: ``x -> up(latent(x))`` with ``up (m x r)``; the latent module is shared, not owned."""

    def __init__(self, latent: JointLatent, out_features: int, bias: bool = False) -> None:
        super().__init__()
        w = latent.down.weight
        self.in_features, self.out_features, self.rank = latent.in_features, out_features, latent.rank
        self.up = FactorLinear(latent.rank, out_features, bias=bias, device=w.device, dtype=w.dtype)
        object.__setattr__(self, "latent", latent)  # plain attribute: not a child, stored once

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.latent(x))

    def to_linear(self) -> nn.Linear:
        """Dense ``nn.Linear`` with ``W = up.weight @ down.weight``."""
        return merged_linear(self.up, self.latent.down.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank} (shared down)"


def find_joint_groups(model: nn.Module, layout) -> dict[str, list[str]]:
    """``attention path -> [q, k, v full names]`` from ``layout`` (:class:`compression.layout.ModelLayout`): every
    attention with separate projections whose three members are still plain ``nn.Linear`` layers of one input
    size (already-joint or compressed groups are skipped).  A fused qkv is no group: compressing the fused matrix
    is the joint factorization.  Nor is an attention with one stream reader (Gemma 4's KV-sharing layers keep only
    ``q_proj``): there is no down to share, and the layer is factorized as any single layer."""
    groups = {}
    for name, members in layout.joint_groups().items():
        if len(members) < 2:
            continue
        children = [model.get_submodule(m) for m in members]
        if all(type(c) is nn.Linear for c in children) and len({c.in_features for c in children}) == 1:
            groups[name] = list(members)
    return groups


def joint_rank_for_ratio(out_features: Sequence[int], in_features: int, ratio: float) -> int:
    """``floor((1-ρ) E Σm / (E + Σm))``: the joint rank with the parameters of the dense q/k/v at ratio ρ."""
    total = sum(out_features)
    exact = (1.0 - ratio) * in_features * total / (in_features + total)
    return max(1, int(exact + 1e-9))  # the tolerance keeps e.g. 0.6 * 552960 / 1536 = 216 from flooring to 215


def stacked_weight(layers: Sequence[nn.Linear], device: torch.device | None = None) -> torch.Tensor:
    w = torch.cat([layer.weight.detach() for layer in layers], 0).double()
    return w.to(device) if device is not None else w


@dataclass
class JointFactors:
    """``ups[i] (m_i x r)``, ``down (r x E)`` float64 and the loss in the method's space."""

    ups: list[torch.Tensor]
    down: torch.Tensor
    truncation_loss: float
    total_energy: float


@torch.no_grad()
def decompose_joint(method: Method, weights: Sequence[torch.Tensor], stats, name: str,
                    rank: int | None = None, components: Sequence[int] | None = None) -> JointFactors:
    """Factor the stacked ``weights`` keeping the top ``rank`` triplets, or exactly ``components``."""
    method.check_stats(stats, name)
    sizes = [w.shape[0] for w in weights]
    mat, ctx = method.transformed(torch.cat([w.double() for w in weights], 0), stats, name)
    u, s, vh = thin_svd(mat, method.config.solver, name)
    if not all_finite(s):
        raise FloatingPointError(f"joint SVD of group {name!r} produced non-finite values")
    if components is not None:
        idx = torch.as_tensor(sorted(set(int(i) for i in components)), dtype=torch.long, device=s.device)
        if idx.numel() == 0 or int(idx.max()) >= s.numel() or int(idx.min()) < 0:
            raise ValueError(f"group {name!r}: components must be distinct indices in [0, {s.numel()})")
    else:
        if rank is None or rank < 1:
            raise ValueError(f"group {name!r}: need a rank >= 1 or explicit components")
        idx = torch.arange(min(rank, s.numel()), device=s.device)
    beta = method.config.beta
    keep = torch.zeros_like(s, dtype=torch.bool)
    keep[idx] = True
    up = method.unmap_left(u[:, idx] * s[idx].pow(1.0 - beta), ctx)
    down = method.unmap(s[idx].pow(beta)[:, None] * vh[idx], ctx)
    return JointFactors(list(up.split(sizes, 0)), down, float(s[~keep].square().sum().sqrt()),
                        float(s.square().sum()))


def install_joint(attn: nn.Module, members: Sequence[str], ups: Sequence[torch.Tensor] | None,
                  down: torch.Tensor | None, rank: int) -> None:
    """Replace ``attn.<members>`` (``nn.Linear``; a member may be a dotted path below ``attn``, e.g. Gemma 4's
    ``q_proj.linear`` inside its clippable wrapper) by :class:`JointProjection` sharing ``attn.qkv_latent``.

    With ``ups``/``down`` ``None`` only the structure is built (to load a state dict into).
    """
    from compression.plan import set_submodule

    layers = [attn.get_submodule(m) for m in members]
    ref = layers[0].weight
    latent = JointLatent(layers[0].in_features, rank, device=ref.device, dtype=ref.dtype, uses=len(layers))
    projections = []
    for i, layer in enumerate(layers):
        proj = JointProjection(latent, layer.out_features, bias=layer.bias is not None)
        with torch.no_grad():
            if ups is not None:
                proj.up.weight.copy_(ups[i])
            if layer.bias is not None:
                proj.up.bias.copy_(layer.bias)
        projections.append(proj)
    if down is not None:
        with torch.no_grad():
            latent.down.weight.copy_(down)
    setattr(attn, LATENT_NAME, latent)
    for m, proj in zip(members, projections):
        set_submodule(attn, m, proj)


def joint_num_parameters(attn: nn.Module, members: Sequence[str]) -> int:
    """Parameters of one joint group: the shared down once plus the three ups (with biases)."""
    latent = getattr(attn, LATENT_NAME)
    return latent.down.weight.numel() + sum(linear_num_parameters(attn.get_submodule(m).up) for m in members)


def restore_joint_(model: nn.Module, originals: Mapping[str, Mapping[str, nn.Linear]]) -> None:
    """Undo :func:`install_joint`: ``originals[group][member full name]`` are the dense layers to put back."""
    from compression.plan import set_submodule

    for gname, layers in originals.items():
        attn = model.get_submodule(gname)
        if hasattr(attn, LATENT_NAME):
            delattr(attn, LATENT_NAME)
        for name, linear in layers.items():
            set_submodule(model, name, linear)


def _member(attn: nn.Module, path: str) -> nn.Module | None:
    try:
        return attn.get_submodule(path)
    except AttributeError:
        return None


def apply_joint_plan(model: nn.Module, joint_groups: Mapping[str, Mapping]) -> list[str]:
    """Rebuild joint groups from plan entries (fresh factors; load the state dict afterwards)."""
    todo = []
    for gname, spec in joint_groups.items():
        try:
            attn = model.get_submodule(gname)
        except AttributeError:
            raise ValueError(f"plan names joint group {gname!r}, which this model does not have") from None
        members = list(spec["members"])
        current = [_member(attn, m) for m in members]
        if all(isinstance(c, JointProjection) for c in current):
            if current[0].rank != int(spec["rank"]):
                raise ValueError(f"joint group {gname!r} already exists with rank {current[0].rank}, plan says "
                                 f"{spec['rank']}")
            continue
        if not all(type(c) is nn.Linear for c in current):
            raise ValueError(f"joint group {gname!r}: members {members} are not all nn.Linear")
        shapes = [(c.out_features, c.in_features) for c in current]
        want = [(int(o), int(spec["in_features"])) for o in spec["out_features"]]
        if shapes != want or [c.bias is not None for c in current] != [bool(b) for b in spec["bias"]]:
            raise ValueError(f"joint group {gname!r}: model shapes {shapes} do not match the plan's {want}")
        todo.append((attn, members, int(spec["rank"]), gname))
    for attn, members, rank, _ in todo:
        install_joint(attn, members, None, None, rank)
    return [g for *_, g in todo]
