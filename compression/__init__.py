"""Pure-PyTorch low-rank compression: layers, statistics, methods, allocation, surgery.

Nothing in this package imports Lightning.  The public entry point is :func:`compress_`::

    stats = collect_stats(model, names, calibration_batches)
    report = compress_(model, CompressionConfig(method="svd_llm", ratio=0.2), stats)
"""

from compression.api import Allocation, CompressionConfig, allocate, compress_
from compression.export import load_compressed, save_compressed
from compression.gradient_allocation import GradientAllocation, gradient_allocation, gradient_importance
from compression.joint import JointQKVConfig, compress_joint_, find_joint_groups, joint_rank_for_ratio
from compression.lowrank import LowRankLinear, rank_for_ratio
from compression.methods import (
    METHODS,
    ASVDConfig,
    MethodConfig,
    SVDConfig,
    build_method,
    method_config_from_dict,
)
from compression.plan import apply_plan, load_plan, merge_lowrank_, merge_plans, save_plan
from compression.quant import ActQuantConfig, QuantLinear, WeightQuantConfig, quantize_model_
from compression.report import CompressionReport, LayerReport, merge_reports
from compression.stats import ActivationStats, ChannelStats, StatsCollector, collect_stats
from compression.targets import eligible_linears, select_targets
from compression.whitening import SVDLLMConfig, SVDLLMV2Config

__all__ = [
    "ActQuantConfig",
    "GradientAllocation",
    "JointQKVConfig",
    "QuantLinear",
    "WeightQuantConfig",
    "compress_joint_",
    "find_joint_groups",
    "gradient_allocation",
    "gradient_importance",
    "joint_rank_for_ratio",
    "merge_plans",
    "merge_reports",
    "quantize_model_",
    "Allocation",
    "allocate",
    "METHODS",
    "ASVDConfig",
    "ActivationStats",
    "ChannelStats",
    "CompressionConfig",
    "CompressionReport",
    "LayerReport",
    "LowRankLinear",
    "MethodConfig",
    "SVDConfig",
    "SVDLLMConfig",
    "SVDLLMV2Config",
    "StatsCollector",
    "apply_plan",
    "build_method",
    "collect_stats",
    "compress_",
    "eligible_linears",
    "load_compressed",
    "load_plan",
    "merge_lowrank_",
    "method_config_from_dict",
    "rank_for_ratio",
    "save_compressed",
    "save_plan",
    "select_targets",
]
