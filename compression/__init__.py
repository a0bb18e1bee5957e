"""Pure-PyTorch low-rank compression: recipe, layers, statistics, methods, allocation, surgery.

Nothing in this package imports Lightning.  The public entry point is :func:`compress_`::

    stats = collect_stats(model, names, calibration_batches)
    report = compress_(model, Recipe(method="svd_llm", ratio=0.2), stats)
"""

import os

# oneDNN (torch's CPU bfloat16 GEMMs) keeps one JIT-compiled kernel per GEMM shape in a cache of 1024 by default.
# A compressed model with per-matrix ranks has more distinct shapes than that in one training step (forward and
# backward of every factor: SmolLM2 at ratio 0.4, gradient ranks, over a thousand), and each miss compiles a
# kernel again: a bf16-autocast LoRA step took 7.0 s instead of 3.7 s (docs/results/llm_general.md). Read by
# oneDNN at its first GEMM, so set here, before any; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "8192")

from compression.allocation import ALLOCATORS, AllocationResult, Matrix, register_allocation
from compression.api import allocate, compress_, prepare
from compression.batches import split_batch, spread_batches
from compression.collector import StatsCollector, collect_stats
from compression.export import load_compressed, save_compressed
from compression.gradient_allocation import GradientAllocation, gradient_allocation, gradient_importance
from compression.joint import find_joint_groups, joint_rank_for_ratio
from compression.lowrank import LowRankLinear, rank_for_ratio
from compression.methods import (
    METHODS,
    ASVDConfig,
    MethodConfig,
    SVDConfig,
    build_method,
    method_config_from_dict,
    stats_needs,
)
from compression.pipeline import CompressionPipeline
from compression.plan import apply_plan, load_plan, merge_lowrank_, merge_plans, save_plan
from compression.quant import ActQuantConfig, QuantLinear, WeightQuantConfig, quantize_model_
from compression.recipe import CalibrationRecipe, LoRARecipe, QuantRecipe, Recipe
from compression.report import CompressionReport, LayerReport, merge_reports
from compression.stats import ActivationStats, ChannelStats
from compression.targets import eligible_linears, select_targets
from compression.whitening import SVDLLMConfig, SVDLLMV2Config

__all__ = [
    "ALLOCATORS",
    "METHODS",
    "ASVDConfig",
    "ActQuantConfig",
    "ActivationStats",
    "AllocationResult",
    "CalibrationRecipe",
    "ChannelStats",
    "CompressionPipeline",
    "CompressionReport",
    "GradientAllocation",
    "LayerReport",
    "LoRARecipe",
    "LowRankLinear",
    "Matrix",
    "MethodConfig",
    "QuantLinear",
    "QuantRecipe",
    "Recipe",
    "SVDConfig",
    "SVDLLMConfig",
    "SVDLLMV2Config",
    "StatsCollector",
    "WeightQuantConfig",
    "allocate",
    "apply_plan",
    "build_method",
    "collect_stats",
    "compress_",
    "eligible_linears",
    "find_joint_groups",
    "gradient_allocation",
    "gradient_importance",
    "joint_rank_for_ratio",
    "load_compressed",
    "load_plan",
    "merge_lowrank_",
    "merge_plans",
    "merge_reports",
    "method_config_from_dict",
    "prepare",
    "quantize_model_",
    "rank_for_ratio",
    "register_allocation",
    "save_compressed",
    "save_plan",
    "select_targets",
    "split_batch",
    "spread_batches",
    "stats_needs",
]
