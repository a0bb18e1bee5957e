"""Weights out of an exported ONNX ViT: initializers mapped back to module names, int8 de-quantized.

``torch.onnx.export`` keeps the ``state_dict`` names of tensors that a graph node reads as they are
(biases, norms, embeddings: ``backbone.encoder.layer.0.norm1.weight``), but the weight of every
``nn.Linear`` is transposed for ``MatMul`` and stored under an anonymous name (``onnx::MatMul_1966``).
The node that reads it carries the module path, so the name is recovered from the node::

    node "/backbone/encoder/layer.0/attention/attention/query/MatMul" reads B = Wᵀ  [in, out]
    ->   "backbone.encoder.layer.0.attention.attention.query.weight" = Bᵀ            [out, in]

onnxruntime's dynamic int8 quantization (``quantize_dynamic``, per channel) replaces that ``MatMul``
by ``MatMulInteger`` on ``B_q`` (int8 ``[in, out]``) with a per-output-column zero point ``z`` and
scale ``s`` (the ``Mul`` that multiplies the activation scale by ``s``)::

    B[i, o] = (B_q[i, o] - z[o]) · s[o]

which is exact: it is the float weight the int8 graph stands for.  The activations of that graph are
quantized at run time too (``DynamicQuantizeLinear``), which the float model does not do;
:func:`dequantize_graph` rewrites each such chain back into one float ``MatMul`` on the de-quantized
weight, giving a float re-execution of the same graph as an independent reference.

An export that interpolates its position embeddings at run time (DINOv2) stores them split in two
anonymous tensors read by the embeddings scope: the class slot ``[1, 1, C]`` (a ``Concat`` input) and
the ``[1, N, C]`` grid (a ``Reshape`` input, ``N`` a square); they are concatenated back into
``<scope>.embeddings.position_embeddings [1, 1 + N, C]``.

Any anonymous float matrix left unmapped is an error: a silently dropped weight would load as random.
"""

from __future__ import annotations

import math
import os

import numpy as np
import torch
from torch import Tensor

ONNX_INSTALL = "pip install onnx"
_ANON = "onnx::"


def _onnx():
    try:
        import onnx
        from onnx import numpy_helper
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(f"reading ONNX weights needs the `onnx` package: run `{ONNX_INSTALL}`") from err
    return onnx, numpy_helper


def load_onnx(path: str | os.PathLike):
    """The ``ModelProto`` of ``path`` (weights included)."""
    onnx, _ = _onnx()
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no ONNX file at {path}")
    return onnx.load(os.fspath(path))


def module_path(node_name: str, suffix: str) -> str:
    """``"/a/b.0/c/MatMul"`` -> ``"a.b.0.c"`` (``suffix`` = the op's own last path element)."""
    parts = node_name.strip("/").split("/")
    if len(parts) < 2 or parts[-1] != suffix:
        raise ValueError(f"node {node_name!r} is not named '<module path>/{suffix}'; cannot tell which module it is")
    return ".".join(parts[:-1])


def _consumers(graph) -> dict[str, list]:
    out: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            out.setdefault(name, []).append(node)
    return out


def _one(nodes: list, op: str, what: str):
    found = [n for n in nodes if n.op_type == op]
    if len(found) != 1:
        raise ValueError(f"expected one {op} node {what}, found {len(found)}")
    return found[0]


def _weight_scale(node, consumers: dict, producers: dict, arrays: dict) -> tuple[np.ndarray, np.ndarray, str]:
    """Zero point, scale and the scale's initializer name of ``MatMulInteger`` ``node``'s weight.

    The chain is ``MatMulInteger -> Cast -> Mul(., s_x · s_w)`` with ``s_x · s_w`` made by a ``Mul`` of the
    run-time activation scale and the weight-scale initializer.
    """
    zero = arrays.get(node.input[3]) if len(node.input) > 3 and node.input[3] else None
    cast = _one(consumers.get(node.output[0], []), "Cast", f"after {node.name}")
    mul = _one(consumers.get(cast.output[0], []), "Mul", f"after {cast.name}")
    scales = producers.get(next(i for i in mul.input if i != cast.output[0]))
    names = [i for i in scales.input if i in arrays] if scales is not None and scales.op_type == "Mul" else []
    if len(names) != 1:
        raise ValueError(f"cannot find the weight scale of {node.name} (expected Mul(activation scale, weight scale))")
    scale = arrays[names[0]]
    return (np.zeros(1, dtype=np.int32) if zero is None else zero.astype(np.int32)), scale, names[0]


def dequantize_int8(quantized: np.ndarray, zero: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """``(B_q - z) · s`` with per-output-column (last axis) or scalar ``z`` / ``s``; float32 ``[in, out]``."""
    out_features = quantized.shape[-1]
    for what, arr in (("scale", scale), ("zero point", zero)):
        if arr.size not in (1, out_features):
            raise ValueError(f"int8 {what} has {arr.size} entries; expected 1 or one per output column "
                             f"({out_features})")
    return ((quantized.astype(np.int32) - zero.reshape(-1)) * scale.reshape(-1).astype(np.float64)).astype(np.float32)


def _position_embeddings(graph, consumers, arrays, anonymous: set[str]) -> dict[str, np.ndarray]:
    """Class slot + grid read by an ``.../embeddings/...`` scope -> ``<scope>.embeddings.position_embeddings``."""
    found: dict[str, dict[str, np.ndarray]] = {}
    for name in sorted(anonymous):
        arr = arrays[name]
        if arr.dtype != np.float32 or arr.ndim != 3 or arr.shape[0] != 1:
            continue
        for node in consumers.get(name, []):
            parts = node.name.strip("/").split("/")
            if "embeddings" not in parts:
                continue
            scope = ".".join(parts[: parts.index("embeddings") + 1])
            if node.op_type == "Concat" and arr.shape[1] == 1:
                found.setdefault(scope, {})["cls"] = name
            elif node.op_type == "Reshape" and math.isqrt(arr.shape[1]) ** 2 == arr.shape[1]:
                found.setdefault(scope, {})["grid"] = name
    out = {}
    for scope, parts in found.items():
        if set(parts) != {"cls", "grid"}:
            raise ValueError(f"found only {sorted(parts)} of the split position embeddings in {scope!r}")
        out[f"{scope}.position_embeddings"] = np.concatenate([arrays[parts["cls"]], arrays[parts["grid"]]], axis=1)
        anonymous -= set(parts.values())
    return out


def onnx_state_dict(model_proto) -> dict[str, Tensor]:
    """Every weight of an exported (optionally int8-quantized) ONNX model under its module name.

    Returns float32 tensors: named initializers as they are, ``MatMul`` / ``MatMulInteger`` weights
    transposed to ``nn.Linear`` layout ``[out, in]`` (de-quantized), split position embeddings joined.

    Raises:
        ValueError: an anonymous float matrix could not be attributed to a module.
    """
    _, numpy_helper = _onnx()
    graph = model_proto.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    out: dict[str, np.ndarray] = {k: v for k, v in arrays.items() if not k.startswith(_ANON)}
    anonymous = {k for k in arrays if k.startswith(_ANON)}
    for node in graph.node:
        if node.op_type == "MatMul" and node.input[1] in arrays:
            out[module_path(node.name, "MatMul") + ".weight"] = arrays[node.input[1]].T
            anonymous.discard(node.input[1])
        elif node.op_type == "MatMulInteger" and node.input[1] in arrays:
            zero, scale, scale_name = _weight_scale(node, consumers, producers, arrays)
            weight = dequantize_int8(arrays[node.input[1]], zero, scale)
            out[module_path(node.name, "MatMul_quant") + ".weight"] = weight.T
            anonymous -= {i for i in node.input if i in arrays} | {scale_name}
    out.update(_position_embeddings(graph, consumers, arrays, anonymous))
    leftover = sorted(k for k in anonymous if arrays[k].dtype == np.float32 and arrays[k].ndim >= 2)
    if leftover:
        raise ValueError(f"anonymous float tensors not attributed to any module: {leftover[:8]}; this export's "
                         "layout is not supported")
    return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in out.items()}


def dequantize_graph(model_proto):
    """A copy of an int8 ``quantize_dynamic`` graph with every ``MatMulInteger`` chain replaced by one float
    ``MatMul`` on the de-quantized weight (module docstring); the rest of the graph is untouched."""
    onnx, numpy_helper = _onnx()
    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    graph = proto.graph
    arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers = _consumers(graph)
    producers = {o: n for n in graph.node for o in n.output}
    drop: set[int] = set()
    new_nodes, new_inits = {}, []
    for node in graph.node:
        if node.op_type != "MatMulInteger" or node.input[1] not in arrays:
            continue
        zero, scale, _ = _weight_scale(node, consumers, producers, arrays)
        cast = _one(consumers[node.output[0]], "Cast", "")
        mul = _one(consumers[cast.output[0]], "Mul", "")
        scales_mul = producers[next(i for i in mul.input if i != cast.output[0])]
        quant = producers[node.input[0]]
        if quant.op_type != "DynamicQuantizeLinear":
            raise ValueError(f"{node.name} reads {quant.op_type}, expected DynamicQuantizeLinear")
        weight_name = node.input[1].removesuffix("_quantized") + "_float"
        new_inits.append(numpy_helper.from_array(dequantize_int8(arrays[node.input[1]], zero, scale), weight_name))
        new_nodes[id(mul)] = onnx.helper.make_node("MatMul", [quant.input[0], weight_name], [mul.output[0]],
                                                   name=node.name.removesuffix("_quant"))
        drop |= {id(node), id(cast), id(scales_mul)}
    kept = [new_nodes.get(id(n), n) for n in graph.node if id(n) not in drop]
    used = {i for n in kept for i in n.input}
    kept = [n for n in kept if not (n.op_type == "DynamicQuantizeLinear" and not set(n.output) & used)]
    used = {i for n in kept for i in n.input}
    graph.ClearField("node")
    graph.node.extend(kept)
    inits = [t for t in graph.initializer if t.name in used] + new_inits
    graph.ClearField("initializer")
    graph.initializer.extend(inits)
    return proto


def with_outputs(model_proto, names: list[str]):
    """A copy of ``model_proto`` that also returns the float intermediate values ``names``."""
    onnx, _ = _onnx()
    proto = onnx.ModelProto()
    proto.CopyFrom(model_proto)
    produced = {o for n in proto.graph.node for o in n.output}
    for name in names:
        if name not in produced:
            raise KeyError(f"no node of the graph produces {name!r}")
        proto.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    return proto
