"""Frozen-feature scores of an image encoder: fidelity to a dense reference, k-NN and linear probes.

- **Feature cosine**: ``mean_i cos(f(x_i), f_dense(x_i))`` over the scored images (1 = unchanged).
- **k-NN** (the DINO protocol): features L2-normalised; each test feature takes the ``k`` most
  cosine-similar probe features, whose labels vote with weights ``exp(sim / T)``; accuracy of the argmax.
- **Linear probe**: multinomial logistic regression on the probe features, standardised with the
  probe set's mean and std, ``min_W,b  mean CE(W z + b, y) + λ ‖W‖²``, solved in float64 by L-BFGS
  from zero (a convex problem, so the solution does not depend on a seed); accuracy on the test set.

:class:`FeatureProbe` gathers features, labels and the probe/test flag batch by batch (DDP-safe,
``cat`` reduction) and fits both probes in :meth:`~FeatureProbe.compute`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics import Metric
from torchmetrics.utilities import dim_zero_cat


def knn_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor, k: int = 20,
                 temperature: float = 0.07, num_classes: int | None = None) -> float:
    """Weighted k-NN accuracy (module docstring); features ``[N, D]``, labels int ``[N]``."""
    if len(train) == 0 or len(test) == 0:
        raise ValueError("k-NN needs probe and test features; one of the sets is empty")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    a, b = F.normalize(train.double(), dim=1), F.normalize(test.double(), dim=1)
    sim, idx = (b @ a.T).topk(min(k, len(a)), dim=1)
    votes = torch.zeros(len(b), num_classes, dtype=torch.float64, device=b.device)
    votes.scatter_add_(1, train_labels[idx], (sim / temperature).exp())
    return float((votes.argmax(1) == test_labels).double().mean())


def linear_probe_accuracy(train: Tensor, train_labels: Tensor, test: Tensor, test_labels: Tensor,
                          l2: float = 1e-3, max_iter: int = 200, num_classes: int | None = None) -> float:
    """Logistic-regression probe accuracy (module docstring); features ``[N, D]``, labels int ``[N]``."""
    if len(train) == 0 or len(test) == 0:
        raise ValueError("the linear probe needs probe and test features; one of the sets is empty")
    num_classes = num_classes or int(max(train_labels.max(), test_labels.max())) + 1
    # Lightning's test loop runs under inference mode, where autograd is off even with enable_grad;
    # the probe's own optimisation leaves it, on fresh (non-inference) copies of the features
    with torch.inference_mode(False), torch.enable_grad():
        train, test, train_labels = train.clone().double(), test.clone().double(), train_labels.clone()
        mean, std = train.mean(0), train.std(0).clamp_min(1e-6)
        x, xt = (train - mean) / std, (test - mean) / std
        weight = torch.zeros(x.shape[1], num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
        bias = torch.zeros(num_classes, dtype=torch.float64, device=x.device, requires_grad=True)
        opt = torch.optim.LBFGS([weight, bias], lr=1.0, max_iter=max_iter, tolerance_grad=1e-9,
                                line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            opt.zero_grad()
            loss = F.cross_entropy(x @ weight + bias, train_labels) + l2 * weight.square().sum()
            loss.backward()
            return loss

        opt.step(closure)
        with torch.no_grad():
            return float(((xt @ weight + bias).argmax(1) == test_labels.to(x.device)).double().mean())


class FeatureProbe(Metric):
    """Feature cosine to a dense reference, k-NN and linear-probe accuracy over one scoring set.

    ``update(features [B, D], labels [B], probe_train bool [B], reference [B, D] or None)``;
    ``compute()`` -> ``{"feature_cos", "knn_acc", "probe_acc"}`` (the accuracies need both probe and
    test samples; the cosine needs references).
    """

    full_state_update = False
    higher_is_better = True
    is_differentiable = False

    def __init__(self, k: int = 20, temperature: float = 0.07, l2: float = 1e-3, **kwargs) -> None:
        super().__init__(**kwargs)
        self.k, self.temperature, self.l2 = k, temperature, l2
        self.add_state("features", default=[], dist_reduce_fx="cat")
        self.add_state("labels", default=[], dist_reduce_fx="cat")
        self.add_state("is_probe", default=[], dist_reduce_fx="cat")
        self.add_state("cos_sum", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("cos_count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, features: Tensor, labels: Tensor, probe_train: Tensor, reference: Tensor | None = None) -> None:
        if features.dim() != 2 or len(features) != len(labels) or len(labels) != len(probe_train):
            raise ValueError(f"features [B, D], labels [B], probe_train [B]; got {tuple(features.shape)}, "
                             f"{tuple(labels.shape)}, {tuple(probe_train.shape)}")
        if not torch.isfinite(features).all():
            raise FloatingPointError("non-finite features: the encoder produced NaN/inf")
        self.features.append(features.detach().double())
        self.labels.append(labels.detach().long())
        self.is_probe.append(probe_train.detach().bool())
        if reference is not None:
            self.cos_sum += F.cosine_similarity(features.detach().double(), reference.detach().double(), dim=1).sum()
            self.cos_count += len(features)

    def compute(self) -> dict[str, Tensor]:
        out: dict[str, Tensor] = {}
        if int(self.cos_count) > 0:
            out["feature_cos"] = self.cos_sum / self.cos_count
        if not self.features:
            return out
        feats, labels, probe = (dim_zero_cat(s) for s in (self.features, self.labels, self.is_probe))
        if probe.any() and (~probe).any():
            args = (feats[probe], labels[probe], feats[~probe], labels[~probe])
            out["knn_acc"] = torch.tensor(knn_accuracy(*args, k=self.k, temperature=self.temperature))
            out["probe_acc"] = torch.tensor(linear_probe_accuracy(*args, l2=self.l2))
        return out
