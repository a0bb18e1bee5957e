"""Perplexity as a torchmetrics ``Metric``: ``exp(Σ NLL / Σ tokens)`` over a whole split.

State is the summed negative log-likelihood (float64) and the token count, both reduced
with ``sum`` across DDP ranks, so the value equals one process scoring every window.
Non-finite losses are an error naming the batch -- never silently skipped (a known pain of
research scripts that drop NaN batches and report a flattering number).
"""

from __future__ import annotations

import torch
from torchmetrics import Metric


class Perplexity(Metric):
    full_state_update = False
    higher_is_better = False
    is_differentiable = False

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("tokens", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, nll_sum: torch.Tensor, count: torch.Tensor | int, batch_idx: int | None = None) -> None:
        """Add one batch: ``nll_sum`` = summed next-token NLL, ``count`` = scored tokens."""
        nll_sum = torch.as_tensor(nll_sum, dtype=torch.float64, device=self.nll.device)
        if not torch.isfinite(nll_sum):
            where = f" in batch {batch_idx}" if batch_idx is not None else ""
            raise FloatingPointError(
                f"non-finite loss ({float(nll_sum)}){where}; the model produced NaN/inf logits -- "
                "check the compression report for layers with extreme truncation or use float32"
            )
        self.nll += nll_sum
        self.tokens += int(count)

    def compute(self) -> torch.Tensor:
        if int(self.tokens) == 0:
            raise ValueError("perplexity of zero tokens: the evaluation loader was empty")
        return torch.exp(self.nll / self.tokens)
