"""One GEMM per shared down product under ``torch.compile``: common-subexpression elimination of pure ops.

Eagerly, :class:`compression.fused.SharedDown` memoizes the stacked down product ``x D_allᵀ`` so
that q/k/v (and gate/up) compute it once.  Under ``torch.compile`` the memo is bypassed (its
object-identity and version checks are not traceable), so the traced graph holds the same
``mm(x, D_all)`` once per member layer; torch 2.14's inductor does not merge them for an inference
graph (AOTAutograd's CSE runs only in the training partitioner; measured on the tiny LLaMA: 29
extern GEMMs per forward instead of 23, three copies of each q/k/v down GEMM and two of each gate/up
one).  :class:`SharedProductsPass` is an inductor ``post_grad_custom_pre_pass`` that merges them:
on the post-grad graph (functionalized ATen ops) a node is replaced by an earlier node with the
same op, the same (already merged) arguments and the same keyword arguments, when

- the op is an ATen operator whose schema mutates nothing and is not random (a random op's two
  calls are two different draws), and
- no mutating op lies between the two (a functionalized graph writes a mutated input back with a
  ``copy_``; a read after it is another value: every mutating node starts a new region, and only
  nodes of one region are merged).

Same op on the same values gives the same result, so the merged graph computes what the unmerged
one does, bit for bit (ATen ops are deterministic on CPU for a fixed input).
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


def _mergeable(node: torch.fx.Node) -> bool:
    target = node.target
    if node.op != "call_function" or not isinstance(target, torch._ops.OpOverload):
        return False
    return not target._schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags


def _mutates(node: torch.fx.Node) -> bool:
    """Conservatively: anything but a non-mutating ATen op or a Python scalar function (``operator``,
    ``math``, ``torch.sym_*``: sizes of dynamic shapes) may write memory."""
    if node.op != "call_function":
        return node.op in ("call_method", "call_module")
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.is_mutable
    module, name = getattr(target, "__module__", None), getattr(target, "__name__", "")
    return not (module in ("_operator", "operator", "math") or (module == "torch" and name.startswith("sym_")))


def merge_common_subexpressions(graph: torch.fx.Graph) -> int:
    """Merge repeated pure ATen calls of ``graph`` in place (see the module docstring); returns how many went."""
    seen: dict[tuple, torch.fx.Node] = {}
    region, removed = 0, 0
    for node in list(graph.nodes):
        if _mutates(node):
            region += 1
            continue
        if not _mergeable(node):
            continue
        try:
            key = (region, node.target, _frozen(node.args), _frozen(node.kwargs))
            hash(key)
        except TypeError:  # an unhashable argument: leave the node alone
            continue
        earlier = seen.get(key)
        if earlier is None:
            seen[key] = node
            continue
        node.replace_all_uses_with(earlier)
        graph.erase_node(node)
        removed += 1
    return removed


def _frozen(value):
    """A hashable stand-in for an FX argument (nodes by identity; lists, tuples and dicts recursively)."""
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, *map(_frozen, value))
    if isinstance(value, dict):
        return ("dict", *sorted((k, _frozen(v)) for k, v in value.items()))
    if isinstance(value, torch.fx.Node):
        return ("node", id(value))
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return ("sym", str(value))
    if isinstance(value, torch.Tensor):  # a constant tensor argument: by identity
        return ("tensor", id(value))
    return value


class CountingPass(CustomGraphPass):
    """An inductor graph pass: ``rewrite(graph)`` edits the graph in place and returns how many nodes it
    changed, summed in ``changed``. Inductor's FX graph cache keys on the source file of the subclass (a new
    version of the pass, a new key); a graph served from that cache is not passed through again."""

    def __init__(self) -> None:
        self.changed = 0

    def rewrite(self, graph: torch.fx.Graph) -> int:
        raise NotImplementedError

    def __call__(self, graph: torch.fx.Graph) -> None:
        self.changed += self.rewrite(graph)

    def uuid(self) -> bytes:
        return get_hash_for_files((str(Path(inspect.getfile(type(self))).resolve()),))


class SharedProductsPass(CountingPass):
    """Inductor post-grad pass running :func:`merge_common_subexpressions`.

    Given as ``torch.compile(..., options={"post_grad_custom_pre_pass": SharedProductsPass()})``."""

    def rewrite(self, graph: torch.fx.Graph) -> int:
        return merge_common_subexpressions(graph)
