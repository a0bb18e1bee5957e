"""Plain ViT encoders (DINOv2, CLIP) from ONNX files: weight mapping, de-quantization, offline cache."""

from models.vit.encoder import CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD, VisionEncoder
from models.vit.onnx_weights import dequantize_graph, dequantize_int8, load_onnx, onnx_state_dict, with_outputs
from models.vit.pretrained import ASSETS, asset_path, build_architecture, cached_vit, load_vit, vit_from_onnx

__all__ = [
    "ASSETS",
    "CLIP_MEAN",
    "CLIP_STD",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "VisionEncoder",
    "asset_path",
    "build_architecture",
    "cached_vit",
    "dequantize_graph",
    "dequantize_int8",
    "load_onnx",
    "load_vit",
    "onnx_state_dict",
    "vit_from_onnx",
    "with_outputs",
]
