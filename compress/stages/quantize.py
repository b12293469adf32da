"""Post-training INT8 quantization with NNCF, written as a QDQ ONNX model TensorRT accepts.

The idea is min-max PTQ (Jacob et al. 2018, "Quantization and Training of Neural Networks
for Efficient Integer-Arithmetic-Only Inference"; NVIDIA's "Integer Quantization for Deep
Learning Inference", Wu et al. 2020): run a few hundred calibration images, record the range
of every activation, and place fake-quantizers with those ranges. NNCF does the calibration
(plus its fast bias correction); we shape the result for TensorRT's explicit-quantization
mode, which accepts only signed int8 with zero points of 0, per-channel on weights:

1. Fold BatchNorm into the preceding convolution first, so weight scales are computed on the
   weights TensorRT will actually run (otherwise the INT8 graph keeps a float BatchNorm).
2. `nncf.quantize(..., preset=PERFORMANCE)`: symmetric weights (per-channel, narrow range,
   signed) and symmetric activations. Overflow fix off: it trades a weight bit for x86
   VNNI-less CPUs, which a GPU does not need.
3. NNCF picks *unsigned* symmetric activation quantizers (uint8, range [0, max]) where the
   calibration saw no negative values (after ReLU). TensorRT rejects uint8, and NNCF 3.4
   cannot be configured out of it: `QuantizationParameters(signedness_to_force=True)` for
   activations conflicts with every hardware config ("constraints ... incompatible with HW
   capabilities"). So we flip those quantizers to signed, keeping their scale: the range
   becomes [-max, max] and a post-ReLU tensor uses 128 of the 256 levels, which is exactly
   how TensorRT represents a non-negative tensor in int8 anyway. The flip is made on the
   torch quantizers, so the fake-quant model and the ONNX file use the same grid.
4. Export with the TorchScript tracer after switching every NNCF quantizer to its
   `ONNX_QUANTIZE_DEQUANTIZE_PAIRS` export mode (NNCF's default export mode emits OpenVINO
   `FakeQuantize` ops); NNCF's strip-to-native path needs torchao, which we do not depend on.
5. Fold the weight QuantizeLinear nodes into int8 initializers (weight -> DequantizeLinear),
   the standard QDQ form: the file holds int8 weights (~4x smaller) and TensorRT reads them
   directly.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import re
import time
import warnings
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compress.io import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
_QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")


# ---------------------------------------------------------------------------- BatchNorm folding


def fold_batchnorm(model: nn.Module) -> int:
    """Fold every BatchNorm that directly follows a convolution into it, in place (eval mode).

    The graph is read with `torch.fx` only to find conv -> bn edges; the model keeps its own
    modules and forward (the folded BatchNorm becomes `nn.Identity`). A model fx cannot trace
    is left unchanged. Returns the number of BatchNorms folded.
    """
    from torch.nn.utils.fusion import fuse_conv_bn_weights

    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception:  # data-dependent control flow etc.: keep BN, the QDQ graph is still valid
        return 0
    modules = dict(model.named_modules())
    calls: dict[str, int] = {}
    for node in graph.nodes:
        if node.op == "call_module":
            calls[node.target] = calls.get(node.target, 0) + 1
    folded = 0
    for node in graph.nodes:
        bn = modules.get(node.target) if node.op == "call_module" else None
        if not isinstance(bn, nn.modules.batchnorm._BatchNorm) or not bn.track_running_stats:
            continue
        prev = node.args[0] if node.args else None
        if not isinstance(prev, torch.fx.Node) or prev.op != "call_module":
            continue
        conv = modules.get(prev.target)
        # A conv reused elsewhere, or whose output is also read raw, cannot absorb the BN.
        if (not isinstance(conv, nn.modules.conv._ConvNd) or isinstance(conv, nn.modules.conv._ConvTransposeNd)
                or len(prev.users) != 1 or calls[prev.target] != 1 or calls[node.target] != 1):
            continue
        weight, bias = fuse_conv_bn_weights(conv.weight, conv.bias, bn.running_mean, bn.running_var, bn.eps,
                                            bn.weight, bn.bias)
        conv.weight, conv.bias = weight, bias
        parent_name, _, leaf = node.target.rpartition(".")
        setattr(modules[parent_name] if parent_name else model, leaf, nn.Identity())
        folded += 1
    return folded


# ---------------------------------------------------------------------------- NNCF


@contextlib.contextmanager
def _quiet_nncf():
    """NNCF logs at INFO and draws rich progress bars on stdout; keep warnings, drop the rest."""
    from nncf.common.logging import nncf_logger

    level = nncf_logger.level
    handler_levels = [h.level for h in nncf_logger.handlers]
    nncf_logger.setLevel(logging.WARNING)
    for h in nncf_logger.handlers:
        h.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.setLevel(level)
        for h, lvl in zip(nncf_logger.handlers, handler_levels):
            h.setLevel(lvl)


def _use_eager_kernels() -> None:
    """Run NNCF's fake-quantize as plain eager torch ops instead of compiled kernels.

    By default NNCF JIT-compiles a C++ extension on first use (ninja + a C++ compiler; we
    measured 25-60 s on 2 cores, against NNCF's own 60 s load timeout, and it can hang on
    stale lock files), and its fallback wraps the same math in `torch.compile` (seconds of
    dynamo/inductor work per process, with recompile warnings). Both speed up QAT backward
    passes; PTQ runs a few hundred forward passes, where NNCF's reference math in eager mode
    costs nothing. Best effort: if NNCF's internals moved, its default behaviour stays.
    An extension already loaded in this process is kept.
    """
    try:
        from nncf.torch.quantization.extensions import QuantizedFunctionsCPU
        from nncf.torch.quantization.reference import torch_executor
    except ImportError:
        return
    if getattr(QuantizedFunctionsCPU, "_loaded_namespace", "absent") is None:
        QuantizedFunctionsCPU._loaded_namespace = type(
            "EagerQuantizedFunctions", (),
            {"Quantize_forward": staticmethod(torch_executor.forward),
             "Quantize_backward": staticmethod(torch_executor.backward)})


def _quantizers(qmodel: nn.Module) -> list[tuple[str, nn.Module]]:
    from nncf.torch.function_hook.wrapper import get_hook_storage
    from nncf.torch.quantization.layers import BaseQuantizer

    return [(name, m) for name, m in get_hook_storage(qmodel).named_hooks() if isinstance(m, BaseQuantizer)]


def _prepare_for_trt(qmodel: nn.Module) -> dict:
    """Make every quantizer signed int8 (zero point 0) and export it as a Q/DQ pair; see module doc."""
    from nncf.torch.quantization.layers import QuantizerExportMode, SymmetricQuantizer

    counts = {"nncf_quantizers": 0, "activations_made_signed": 0}
    for name, q in _quantizers(qmodel):
        if not isinstance(q, SymmetricQuantizer) or q.num_bits != 8 or q.is_half_range:
            raise RuntimeError(f"NNCF produced a quantizer TensorRT cannot take at {name}: {q!r} "
                               f"(expected 8-bit symmetric, full range)")
        counts["nncf_quantizers"] += 1
        if not q.signed:  # only activations can be unsigned; weights are always signed
            q.signed = True  # same scale, levels [-128, 127] instead of [0, 255]
            counts["activations_made_signed"] += 1
        q.set_export_mode(QuantizerExportMode.ONNX_QUANTIZE_DEQUANTIZE_PAIRS)
    return counts


# ---------------------------------------------------------------------------- ONNX helpers


def _constant_values(graph) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


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
    consts = _constant_values(graph)
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
    consts = _constant_values(proto.graph)
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


def onnx_size_bytes(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


# ---------------------------------------------------------------------------- the PTQ entry point


class _Forward(nn.Module):
    """A module with a real forward around a bare container."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def quantize_ptq(model: nn.Module, calib_images: torch.Tensor, onnx_path: Path, input_shape: tuple[int, int, int], *,
                 subset_size: int = 300, batch_size: int = 32, opset: int = 17,
                 finetune: Callable[[nn.Module], dict] | None = None) -> dict:
    """Calibrate an INT8 copy of `model` on `calib_images` and write it as a QDQ ONNX file.

    subset_size  -- calibration images used (the first `subset_size` of `calib_images`)
    batch_size   -- images per calibration forward pass
    finetune     -- quantization-aware training: called with the calibrated fake-quantized model
                    (already on TensorRT's signed int8 grid) before export; returns its metrics
    The caller's model is not modified. Returns facts about the result for the manifest.
    """
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    start = time.perf_counter()
    onnx_path = Path(onnx_path)
    # Calibrate on CPU whatever the model's device: on CUDA, NNCF first compiles its CUDA
    # kernels (needs nvcc, minutes) for what is a few hundred forward passes.
    qmodel = copy.deepcopy(model).cpu().eval()
    if isinstance(qmodel, nn.Sequential):  # NNCF appends its hook storage to the top module,
        qmodel = _Forward(qmodel)          # which a bare Sequential would then call as a layer
    bn_folded = fold_batchnorm(qmodel)

    images = calib_images[:subset_size].detach().cpu()
    if len(images) == 0:
        raise ValueError("quantize_ptq needs at least one calibration image")
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images), batch_size=batch_size, shuffle=False)
    n_batches = math.ceil(len(images) / batch_size)
    dataset = nncf.Dataset(loader, lambda batch: batch[0].float())
    _use_eager_kernels()
    with _quiet_nncf():
        qmodel = nncf.quantize(
            qmodel,
            dataset,
            preset=nncf.QuantizationPreset.PERFORMANCE,  # symmetric weights and activations
            target_device=nncf.TargetDevice.ANY,
            subset_size=n_batches,  # NNCF counts items of the loader, i.e. batches
            advanced_parameters=AdvancedQuantizationParameters(overflow_fix=OverflowFix.DISABLE),
        )
    calib_seconds = time.perf_counter() - start
    counts = _prepare_for_trt(qmodel)
    qat = None
    if finetune is not None:
        qat = finetune(qmodel)
        qmodel.cpu().eval()

    dummy = torch.zeros(1, *input_shape)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # Same exporter and reasons as compress/stages/export.py (TorchScript tracer); NNCF's
        # quantizers emit Q/DQ only under torch.jit tracing. Its tracer warnings are about
        # quantizer levels read as Python numbers, which are constants by design.
        warnings.filterwarnings("ignore", message=re.escape("You are using the legacy TorchScript-based ONNX export"))
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(qmodel, (dummy,), buf, dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
                          dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}},
                          opset_version=opset, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    weights_folded = _fold_weight_quantize(proto)
    onnx.checker.check_model(proto)

    params = _qdq_params(proto)
    bad = [p["name"] for p in params if p["zero_point"].dtype != np.int8 or np.any(p["zero_point"] != 0)]
    if bad:  # never hand TensorRT a file it will reject; this is a bug in the steps above
        raise RuntimeError(f"non-int8 or non-zero zero points in {len(bad)} Q/DQ nodes, e.g. {bad[:3]}")
    data = proto.SerializeToString()
    atomic_write_bytes(onnx_path, data)

    ops = [n.op_type for n in proto.graph.node]
    initializers = {init.name for init in proto.graph.initializer}
    weight_dq = [p for p in params if p["op"] == "DequantizeLinear" and p["input"] in initializers]
    return {
        "onnx": str(onnx_path),
        "onnx_bytes": len(data),
        "opset": opset,
        "calibration_images": len(images),
        "calibration_batches": n_batches,
        "quantize_linear": ops.count("QuantizeLinear"),
        "dequantize_linear": ops.count("DequantizeLinear"),
        "weight_dequantize_linear": len(weight_dq),
        "weight_dequantize_per_channel": int(sum(np.asarray(p["scale"]).size > 1 for p in weight_dq)),
        "int8_weight_initializers": weights_folded,
        "bn_folded": bn_folded,
        **counts,
        "calibration_seconds": round(calib_seconds, 3),
        "seconds": round(time.perf_counter() - start, 3),
        "nncf_version": nncf.__version__,
        **({"qat": qat} if qat is not None else {}),
    }


# ----------------------------------------------------------------------------- stage

def run(cfg, ctx):
    """NNCF PTQ of the parent model, calibrated on training images (then, for `qat`, fine-tuned with KD
    from the teacher on the fake-quantized grid), written as QDQ ONNX."""
    from compress.context import Artifact

    parent = ctx.inputs[0]
    model = ctx.load_model(parent).eval()
    calib = ctx.data.calibration_images(cfg.calibration_size).cpu()
    path = ctx.stage_dir / "model_int8.onnx"
    finetune = None
    if cfg.method == "qat":
        from compress.losses import KDLoss
        from compress.training import fit

        teachers = [ctx.load_model(a) for a in ctx.teachers]

        def finetune(qmodel: nn.Module) -> dict:
            return fit(qmodel, ctx.data, cfg, cfg.epochs, device=ctx.device, teachers=teachers,
                       kd_loss=KDLoss(cfg.temperature, cfg.alpha, cfg.label_smoothing), log=ctx.log,
                       progress=ctx.progress, desc=f"{ctx.stage_name} (qat)")

    info = quantize_ptq(model, calib, path, ctx.input_shape(), subset_size=cfg.calibration_size, finetune=finetune)
    # How far INT8 moved from the float model it came from, on validation images.
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    agree = total = 0
    for x, _ in ctx.data.eval_batches("val" if ctx.data.num_val else "train"):
        x = x.cpu()
        q = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0].argmax(1)
        with torch.no_grad():
            agree += int((torch.from_numpy(q) == model(x).argmax(1)).sum())
        total += x.shape[0]
    info["top1_agreement_with_fp32"] = agree / max(total, 1)
    ctx.log(f"[{ctx.stage_name}] INT8 QDQ ONNX: {info['quantize_linear']} Q / {info['dequantize_linear']} DQ nodes, "
            f"{info['calibration_images']} calibration images, top-1 agreement with FP32 "
            f"{info['top1_agreement_with_fp32'] * 100:.1f}%")
    info.pop("onnx", None)
    return Artifact(name=ctx.stage_name, stage="quantize", parent=parent.name, model=parent.model,
                    files={"onnx_int8": str(path)}, params=parent.params, macs=parent.macs, precision="int8",
                    metrics={**info, "teachers": parent.metrics.get("teachers", [])})
