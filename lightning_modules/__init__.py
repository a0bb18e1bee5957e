"""LightningModules: one generic compression module plus small per-family specs."""

from lightning_modules.module import CompressionModule
from lightning_modules.specs import CausalLMSpec, ModelSpec
from lightning_modules.vggt_spec import VGGTSpec
from lightning_modules.vit_spec import ViTSpec
from lightning_modules.vlm_spec import VLMSpec

__all__ = ["CausalLMSpec", "CompressionModule", "ModelSpec", "VGGTSpec", "VLMSpec", "ViTSpec"]
