"""Perplexity as a torchmetrics ``Metric``: ``exp(Σ NLL / Σ tokens)`` over a whole split.

Perplexity is token-weighted: summed next-token negative log-likelihoods divided by the
number of scored tokens, exponentiated once at the end (never an average of per-batch
perplexities).  The state is the NLL sum in float64 (millions of tokens of ~2-nat losses
lose digits in float32) and the token count, both reduced with ``sum`` across DDP ranks,
so the value equals one process scoring every window.

Non-finite losses are an error naming the batch -- never silently skipped: dropping NaN
batches reports a flattering number for a model that is in fact broken.
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class Perplexity(Metric):
    """Token-weighted perplexity.

    ``update(nll, count=None, batch_idx=None)``: ``nll`` is a summed NLL (scalar) with its
    token ``count``, or per-token NLLs of any shape (``count`` defaults to their number).
    """

    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    nll: torch.Tensor
    tokens: torch.Tensor

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll: torch.Tensor | float, count: torch.Tensor | int | None = None,
               batch_idx: int | None = None) -> None:
        """Add one batch's summed (or per-token) next-token NLL in nats and its scored-token count."""
        nll = torch.as_tensor(nll).detach().to(device=self.nll.device, dtype=torch.float64)
        if not bool(torch.isfinite(nll).all()):
            where = f" in batch {batch_idx}" if batch_idx is not None else ""
            bad = nll[~torch.isfinite(nll)].flatten()[0].item()
            raise FloatingPointError(
                f"non-finite loss ({bad}){where}: the model produced NaN/inf logits. Check the compression report "
                "for layers truncated to extreme ranks, evaluate in float32, or inspect that batch's input_ids"
            )
        n = nll.numel() if count is None else int(count)
        if n < 0 or (n == 0 and float(nll.sum()) != 0.0):
            raise ValueError(f"token count must be positive for a non-zero NLL, got count={n}")
        self.nll += nll.sum()
        self.tokens += n

    def compute(self) -> torch.Tensor:
        if int(self.tokens) == 0:
            raise ValueError("perplexity of zero tokens: the evaluation loader was empty or every label was -100")
        return torch.exp(self.nll / self.tokens)
