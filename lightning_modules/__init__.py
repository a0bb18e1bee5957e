"""LightningModules: one generic compression module plus small per-family specs."""

from lightning_modules.module import CompressionModule
from lightning_modules.specs import CausalLMSpec, ModelSpec

__all__ = ["CausalLMSpec", "CompressionModule", "ModelSpec"]
