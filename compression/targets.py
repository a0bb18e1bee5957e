"""Which ``nn.Linear`` layers a compression run touches.

Patterns are shell-style globs (``fnmatch``) on the full module name; a pattern also
matches any name that *ends* in ``.<pattern>``, so ``q_proj`` selects every
``...self_attn.q_proj`` and ``model.layers.0.*`` one block.  Every pattern given --
target, exclude or override -- must match at least one eligible layer, otherwise the run
stops with the names that were available (a typo never silently compresses nothing).

Default filter (always applied, reported as skips):
- only plain ``nn.Linear``: ``Conv1D`` (GPT-2), ``nn.Linear`` subclasses (Falcon) and 3-D expert tensors
  (Mixtral, Qwen2-MoE) become targets once converted by :func:`compression.forms.linearize_`
  (``CausalLMSpec`` does it when it builds the model); until then they are reported with that hint;
- not ``nn.MultiheadAttention.out_proj`` (MHA reads ``out_proj.weight`` directly), nor any layer whose ``weight``
  or ``bias`` the code of a module above it reads through its attribute path, for a product (Jamba's and Mamba's
  ``dt_proj.weight @ x``) or only for its dtype (Ergo's decoder layer: ``self.self_attn.o_proj.weight.dtype``;
  the DeepSeek-V3.2 indexer's ``weights_proj``): a factorized layer has neither, so the model would break;
- not an output layer whose weight is tied to an ``nn.Embedding``;
- not a factor of an already compressed :class:`~compression.lowrank.LowRankLinear`, and
  not an already compressed layer (rerunning compression changes nothing).

Coverage: :func:`select_targets` also lists, in ``Selection.skipped``, every other weight matrix of the model
(any parameter with two or more dimensions outside the chosen layers: embeddings, the output head, routers,
3-D expert tensors, layers left out by the targets) with the reason and its parameter count, so a report
says what a "ratio" does *not* cover (:func:`uncovered_weights`).
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from torch import nn

from compression.lowrank import LowRankLinear


def name_matches(name: str, pattern: str) -> bool:
    return fnmatchcase(name, pattern) or fnmatchcase(name, "*." + pattern)


@dataclass
class Selection:
    """Selected layer names, in model order, and ``name -> reason`` for eligible-looking skips."""

    names: list[str]
    skipped: dict[str, str] = field(default_factory=dict)


@functools.lru_cache(maxsize=256)
def _source_of(cls: type) -> str:
    """The source of ``cls`` and of its bases up to ``nn.Module`` ("" where unavailable: built-ins, REPL classes);
    the module's other code (weight initialization, say) is not the forward's."""
    parts = []
    for base in cls.__mro__:
        if base in (nn.Module, object) or base.__module__.startswith("torch."):
            continue
        try:
            parts.append(inspect.getsource(base))
        except (OSError, TypeError):
            continue
    return "\n".join(parts)


_WEIGHT_READ = re.compile(r"\bself\.((?:[A-Za-z_]\w*\.)*?[A-Za-z_]\w*)\.(weight|bias)\b")


@functools.lru_cache(maxsize=256)
def weight_reads(cls: type) -> dict[str, str]:
    """``attribute path -> first source line`` for every ``self.<path>.weight`` / ``.bias`` the code of ``cls``
    reads (``self.dt_proj.weight``, ``self.self_attn.o_proj.weight.dtype``), leaving out comments, ``isinstance``
    checks and ``nn.init`` calls.  A dtype or device read counts: a factorized layer has no ``weight`` to ask."""
    reads: dict[str, str] = {}
    for line in _source_of(cls).splitlines():
        code = line.strip()
        if code.startswith("#") or "isinstance(" in code or "init." in code:
            continue
        for match in _WEIGHT_READ.finditer(code):
            reads.setdefault(match.group(1), code)
    return reads


def _bloom_exact_tp(module: nn.Module) -> bool:
    return module.pretraining_tp > 1 and module.slow_but_exact


GUARDED_READS: dict[tuple[str, str], Callable[[nn.Module], bool]] = {
    ("BloomAttention", "dense"): _bloom_exact_tp,
    ("BloomMLP", "dense_4h_to_h"): _bloom_exact_tp,
}
"""Weight reads that run only in a branch the module's own flags decide: ``(class name, attribute path) -> whether
the branch runs for this module``.  BLOOM slices ``dense.weight`` / ``dense_4h_to_h.weight`` only under
``pretraining_tp > 1 and slow_but_exact`` (an exact replay of its tensor-parallel pretraining); its released configs
have ``slow_but_exact: false``, and then its output projections are targets.  A class not listed here keeps every
read (a renamed copy of BLOOM's code included)."""


def ancestor_weight_read(modules: dict[str, nn.Module], name: str) -> str | None:
    """The first source line where the class of a module above ``name`` (its parent, grandparent... up to the
    model; ``modules``: ``dict(model.named_modules())``) reads the ``weight`` or ``bias`` of the layer ``name``
    through its attribute path (Jamba's mixer: ``self.dt_proj.weight``; Ergo's decoder layer:
    ``self.self_attn.o_proj.weight.dtype``), or ``None``.  A read in a branch that does not run for this module
    (:data:`GUARDED_READS`) does not count."""
    parts = name.split(".")
    for depth in range(len(parts) - 1, -1, -1):
        ancestor = modules.get(".".join(parts[:depth]))
        path = ".".join(parts[depth:])
        if ancestor is None or (line := weight_reads(type(ancestor)).get(path)) is None:
            continue
        guard = GUARDED_READS.get((type(ancestor).__name__, path))
        if guard is None or guard(ancestor):
            return line
    return None


def _tied_embedding_weights(model: nn.Module) -> set[int]:
    return {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}


def eligible_linears(model: nn.Module) -> tuple[dict[str, nn.Linear], dict[str, str]]:
    """``(name -> layer)`` of layers the default filter allows, and ``name -> reason`` of the rest."""
    embeddings = _tied_embedding_weights(model)
    modules = dict(model.named_modules())
    lowrank_children: set[str] = set()
    mha_out: set[str] = set()
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        prefix = f"{name}." if name else ""
        if isinstance(module, LowRankLinear):
            lowrank_children.update({prefix + "down", prefix + "up"})
            skipped[name] = "already compressed"
        elif isinstance(module, nn.MultiheadAttention):
            mha_out.add(prefix + "out_proj")
    from compression.forms import _conv1d_class

    conv1d = _conv1d_class()
    eligible: dict[str, nn.Linear] = {}
    for name, module in model.named_modules():
        if conv1d is not None and type(module) is conv1d:
            skipped[name] = ("transformers Conv1D (weight stored in x out); compression.forms.linearize_ converts it "
                             "to nn.Linear")
            continue
        if not isinstance(module, nn.Linear) or name in lowrank_children:
            continue
        if name in mha_out:
            skipped[name] = "nn.MultiheadAttention.out_proj (read directly by MHA)"
        elif type(module) is not nn.Linear:
            skipped[name] = (f"not a plain nn.Linear ({type(module).__name__}); compression.forms.linearize_ converts "
                             "it when its forward is x Wᵀ + b and it is not a MoE router")
        elif id(module.weight) in embeddings:
            skipped[name] = "weight tied to an input embedding"
        elif (read := ancestor_weight_read(modules, name)) is not None:
            skipped[name] = (f"a module above it reads its weight directly ({read!r}); a factorized layer has "
                             "no weight")
        else:
            eligible[name] = module
    return eligible, skipped


def _unmatched_error(kind: str, pattern: str, names: Sequence[str], skipped: dict[str, str] | None = None
                     ) -> ValueError:
    preview = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
    hint = ""
    matched = {n: r for n, r in (skipped or {}).items() if name_matches(n, pattern)}
    if matched:
        name, reason = next(iter(matched.items()))
        hint = f" It matches {len(matched)} skipped layer(s), e.g. {name!r}: {reason}."
    return ValueError(
        f"{kind} pattern {pattern!r} matches no eligible nn.Linear layer.{hint} "
        f"Eligible layers ({len(names)}): {preview or 'none'}"
    )


def _weight_reason(model: nn.Module, module: nn.Module, pname: str, param) -> str:
    if isinstance(module, nn.Embedding):
        return "input embedding (a table lookup, not a product)"
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if module is head:
        return "output head (not targeted; its error hits every token's logits)"
    if param.dim() == 3:
        return (f"3-D expert tensor {pname!r} ({param.shape[0]} experts); compression.forms.linearize_ makes each "
                "expert matrix a target")
    if isinstance(module, nn.Linear):
        return "not targeted" if type(module) is nn.Linear else f"not a plain nn.Linear ({type(module).__name__})"
    return f"weight of a {type(module).__name__} (not a linear layer; a MoE router stays dense)"


def uncovered_weights(model: nn.Module, chosen: Sequence[str]) -> dict[str, tuple[str, int]]:
    """``parameter name -> (reason, parameters)`` for every weight matrix (``dim >= 2``) outside the ``chosen``
    layers and outside already-compressed layers; each shared (tied) tensor is counted once."""
    from compression.joint import JointLatent, JointProjection

    chosen_set = set(chosen)
    done: set[int] = set()
    for name, module in model.named_modules():
        if name in chosen_set or isinstance(module, (LowRankLinear, JointLatent, JointProjection)):
            done.update(id(p) for p in module.parameters())
    out: dict[str, tuple[str, int]] = {}
    for mname, module in model.named_modules():
        for pname, param in module.named_parameters(recurse=False):
            if param.dim() < 2 or id(param) in done:
                continue
            done.add(id(param))
            out[f"{mname}.{pname}" if mname else pname] = (_weight_reason(model, module, pname, param), param.numel())
    return out


def select_targets(
    model: nn.Module,
    targets: Sequence[str] | None = None,
    exclude: Sequence[str] = (),
    overrides: Sequence[str] = (),
) -> Selection:
    """Eligible layers matching any of ``targets`` (all eligible layers when ``None``) minus ``exclude``.

    ``overrides`` are further patterns that must each match a *selected* layer.
    """
    eligible, skipped = eligible_linears(model)
    names = list(eligible)
    if targets is not None and len(targets) == 0:
        raise ValueError("targets is an empty list; give patterns, or None for every eligible layer")
    if targets is None:
        chosen = names
    else:
        for pattern in targets:
            if not any(name_matches(n, pattern) for n in names):
                raise _unmatched_error("target", pattern, names, skipped)
        chosen = [n for n in names if any(name_matches(n, p) for p in targets)]
    for pattern in exclude:
        if not any(name_matches(n, pattern) for n in chosen):
            raise _unmatched_error("exclude", pattern, chosen)
    chosen = [n for n in chosen if not any(name_matches(n, p) for p in exclude)]
    for pattern in overrides:
        if not any(name_matches(n, pattern) for n in chosen):
            raise _unmatched_error("override", pattern, chosen)
    if not chosen:
        hint = f" ({len(skipped)} layers skipped, e.g. {next(iter(skipped.items()))})" if skipped else ""
        raise ValueError(f"no layer left to compress after applying targets and excludes{hint}")
    for name, (reason, count) in uncovered_weights(model, chosen).items():
        layer = name.rpartition(".")[0]
        if layer not in skipped:
            skipped[name] = f"{reason} [{count:,} parameters]"
        elif not skipped[layer].endswith(" parameters]"):  # a layer skipped above (e.g. a foreign Linear subclass)
            skipped[layer] += f" [{count:,} parameters]"  # still counts as not covered
    return Selection(chosen, skipped)


def layer_type(name: str) -> str:
    """Group key for per-type allocation: the name with its numeric parts replaced by ``*``.

    ``model.layers.7.self_attn.q_proj`` -> ``model.layers.*.self_attn.q_proj``.
    """
    return ".".join("*" if part.isdigit() else part for part in name.split("."))
