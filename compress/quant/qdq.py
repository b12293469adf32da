"""QDQ ONNX in the form TensorRT's explicit quantization takes: weight QuantizeLinear nodes folded into
int8 initializers, every zero point int8 0, written atomically (see compress.quant for the whole recipe)."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from compress.io import atomic_write_bytes
from compress.onnx_export import constant_values

_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


def _axis(node) -> int:
    for attr in node.attribute:
        if attr.name == "axis":
            return attr.i
    return 1


def _fold_weight_quantize(proto) -> int:
    """Replace `float weight -> QuantizeLinear` with a precomputed int8 initializer.

    Rounding follows the ONNX spec (float32 divide, round half to even, saturate), so the
    folded graph computes bit-identically to the unfolded one. Returns the number folded.
    """
    from onnx import numpy_helper

    graph = proto.graph
    consts = constant_values(graph)
    initializers = {init.name for init in graph.initializer}
    folded_names, new_inits, dead = {}, [], []
    for node in graph.node:
        if node.op_type != "QuantizeLinear" or node.input[0] not in initializers or len(node.input) < 3:
            continue
        w, scale, zp = consts[node.input[0]], consts.get(node.input[1]), consts.get(node.input[2])
        if scale is None or zp is None:
            continue
        shape = [1] * w.ndim
        if scale.ndim == 1 and scale.size > 1:
            shape[_axis(node) % w.ndim] = scale.size
        scale_b = scale.astype(np.float32).reshape(shape if scale.size > 1 else ())
        zp_b = zp.astype(np.int32).reshape(shape if zp.size > 1 else ())
        info = np.iinfo(zp.dtype)
        q = np.clip(np.rint(w.astype(np.float32) / scale_b) + zp_b, info.min, info.max).astype(zp.dtype)
        name = f"{node.input[0]}_quantized"
        new_inits.append(numpy_helper.from_array(q, name))
        folded_names[node.output[0]] = name
        dead.append(node)
    for node in dead:
        graph.node.remove(node)
    graph.initializer.extend(new_inits)
    for node in graph.node:
        for i, inp in enumerate(node.input):
            if inp in folded_names:
                node.input[i] = folded_names[inp]
    _drop_unused(graph)
    return len(dead)


def _drop_unused(graph) -> None:
    """Remove initializers and Constant nodes nothing reads any more (the float weights)."""
    used = {inp for node in graph.node for inp in node.input} | {o.name for o in graph.output}
    keep = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    unused_consts = [n for n in graph.node if n.op_type == "Constant" and n.output[0] not in used]
    for node in unused_consts:
        graph.node.remove(node)


def _qdq_params(proto) -> list[dict]:
    """One entry per Q/DQ node: op, name, axis, scale and zero point (arrays) and the zp dtype."""
    consts = constant_values(proto.graph)
    out = []
    for node in proto.graph.node:
        if node.op_type not in _QDQ_OPS:
            continue
        # An omitted zero point means uint8 0 in ONNX; report it as such so checks catch it.
        zp = consts.get(node.input[2]) if len(node.input) > 2 and node.input[2] else np.zeros((), np.uint8)
        out.append({"op": node.op_type, "name": node.name, "axis": _axis(node), "input": node.input[0],
                    "scale": consts.get(node.input[1]), "zero_point": zp})
    return out


def qdq_zero_points(onnx_path: str | os.PathLike) -> list[int]:
    """Every zero-point value of every QuantizeLinear/DequantizeLinear node (flattened)."""
    import onnx

    proto = onnx.load(str(onnx_path))
    return [int(v) for p in _qdq_params(proto) for v in np.asarray(p["zero_point"]).ravel()]


def write_qdq(proto, onnx_path: str | os.PathLike) -> dict:
    """Fold weight QuantizeLinear nodes into int8 initializers, check the file is what TensorRT takes
    (every zero point int8 0), write it atomically; return facts about it. `proto` is modified."""
    import onnx

    weights_folded = _fold_weight_quantize(proto)
    onnx.checker.check_model(proto)
    params = _qdq_params(proto)
    bad = [p["name"] for p in params if p["zero_point"].dtype != np.int8 or np.any(p["zero_point"] != 0)]
    if bad:  # never hand TensorRT a file it will reject; this is a bug in the steps before
        raise RuntimeError(f"non-int8 or non-zero zero points in {len(bad)} Q/DQ nodes, e.g. {bad[:3]}")
    data = proto.SerializeToString()
    atomic_write_bytes(Path(onnx_path), data)
    ops = [n.op_type for n in proto.graph.node]
    initializers = {init.name for init in proto.graph.initializer}
    weight_dq = [p for p in params if p["op"] == "DequantizeLinear" and p["input"] in initializers]
    return {
        "onnx_bytes": len(data),
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "weight_dequantize_linear": len(weight_dq),
        "weight_dequantize_per_channel": int(sum(np.asarray(p["scale"]).size > 1 for p in weight_dq)),
        "int8_weight_initializers": weights_folded,
    }
