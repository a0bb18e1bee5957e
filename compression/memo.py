"""One product of one input tensor, kept for the layers that read it: the memo behind a down factor
shared by several layers (:class:`compression.fused.SharedDown`, :class:`compression.joint.JointLatent`).

The model's own code calls ``q_proj(x)``, ``k_proj(x)``, ``v_proj(x)``; the first call computes the
shared product and the others find it here.  An input is recognised by identity (a weak reference:
the memo does not keep it alive), its version counter (an in-place change makes it a new input;
inference-mode tensors carry none, and identity alone recognises them) and the grad mode.  After
``uses`` reads the product is let go, so none outlives its use: one per group would otherwise stay
alive until the next input (``tokens x r`` numbers each; under autograd, past the backward).
"""

from __future__ import annotations

import weakref

import torch


class InputMemo:
    """The product of the last input, for ``uses`` reads (``None``: kept until the next input)."""

    def __init__(self, uses: int | None, what: str = "memoized product") -> None:
        if uses is not None and uses < 1:
            raise ValueError(f"a {what} needs at least one reader, got uses={uses}")
        self.uses = uses
        self._entry: list | None = None  # [weakref to x, version, grad mode, product, reads left or None]

    def get(self, x: torch.Tensor) -> torch.Tensor | None:
        """The product of ``x`` if it is held (counting the read), else ``None``."""
        entry = self._entry
        if entry is None or entry[0]() is not x or entry[2] != torch.is_grad_enabled():
            return None
        if entry[1] != (None if x.is_inference() else x._version):
            return None
        if entry[4] is not None:
            entry[4] -= 1
            if entry[4] <= 0:
                self._entry = None
        return entry[3]

    def put(self, x: torch.Tensor, product: torch.Tensor) -> torch.Tensor:
        """Hold ``product`` of ``x`` for the remaining ``uses - 1`` reads (its first read is this one)."""
        left = None if self.uses is None else self.uses - 1
        version = None if x.is_inference() else x._version
        self._entry = None if left == 0 else [weakref.ref(x), version, torch.is_grad_enabled(), product, left]
        return product

    @property
    def held(self) -> bool:
        return self._entry is not None

    def clear(self) -> None:
        self._entry = None

    def __getstate__(self) -> dict:
        return {"uses": self.uses, "_entry": None}  # a weak reference cannot be pickled; the memo is transient
