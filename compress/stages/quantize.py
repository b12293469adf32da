"""Post-training INT8 quantization (NNCF or ONNX Runtime), written as a QDQ ONNX model TensorRT accepts.

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

`backend: onnxruntime` instead runs ONNX Runtime's `quantize_static` on the parent's FP32 ONNX,
configured to the same rules (see `ort_qdq`). Both backends hand over the graph before step 5,
so `_sensitivity.py` can keep chosen layers in float (accuracy-aware PTQ, `max_accuracy_drop`)
and write the per-layer report; then `write_qdq` folds, checks and writes the file.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compress.io import atomic_write_bytes
from compress.onnx_export import constant_values, export_bytes

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


def onnx_size_bytes(path: str | os.PathLike) -> int:
    return Path(path).stat().st_size


# ---------------------------------------------------------------------------- writing the QDQ file


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


# ---------------------------------------------------------------------------- backend 1: NNCF


class _Forward(nn.Module):
    """A module with a real forward around a bare container."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


def nncf_qdq(model: nn.Module, calib_images: torch.Tensor, input_shape: tuple[int, int, int], *,
             subset_size: int = 300, batch_size: int = 32, opset: int = 17,
             finetune: Callable[[nn.Module], dict] | None = None) -> tuple[object, dict]:
    """NNCF INT8 of `model` as an ONNX QDQ graph whose weights are still float behind their Q/DQ pairs
    (`write_qdq` folds them). Arguments as for `quantize_ptq`; returns (onnx.ModelProto, facts)."""
    import nncf
    import onnx
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix

    start = time.perf_counter()
    # Calibrate on CPU whatever the model's device: on CUDA, NNCF first compiles its CUDA
    # kernels (needs nvcc, minutes) for what is a few hundred forward passes.
    qmodel = copy.deepcopy(model).cpu().eval()
    if isinstance(qmodel, nn.Sequential):  # NNCF appends its hook storage to the top module,
        qmodel = _Forward(qmodel)          # which a bare Sequential would then call as a layer
    bn_folded = fold_batchnorm(qmodel)
    float_biases = {name: p.detach().clone() for name, p in qmodel.named_parameters() if name.endswith("bias")}

    images = calib_images[:subset_size].detach().cpu()
    if len(images) == 0:
        raise ValueError("quantization needs at least one calibration image")
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
    proto = onnx.load_from_string(export_bytes(qmodel, input_shape, opset))
    if finetune is None:  # after QAT the trained biases belong to the trained weights
        _keep_uncorrected_biases(proto, float_biases)
    return proto, {
        "backend": "nncf",
        "opset": opset,
        "calibration_images": len(images),
        "calibration_batches": n_batches,
        "bn_folded": bn_folded,
        **counts,
        "calibration_seconds": round(calib_seconds, 3),
        "nncf_version": nncf.__version__,
        **({"qat": qat} if qat is not None else {}),
    }


def _keep_uncorrected_biases(proto, float_biases: dict[str, torch.Tensor]) -> None:
    """NNCF's fast bias correction moves each quantized layer's bias to cancel the mean error of its
    INT8 output; for a layer the sensitivity sweep puts back in float that shift is an error, so the
    bias from before NNCF rides along (see _sensitivity.FLOAT_BIAS_SUFFIX; `write_qdq` drops unused ones)."""
    from onnx import numpy_helper

    from compress.stages._sensitivity import FLOAT_BIAS_SUFFIX

    extra = []
    for init in proto.graph.initializer:
        before = float_biases.get(init.name)
        if before is not None and tuple(before.shape) == tuple(init.dims):
            value = before.cpu().numpy().astype(numpy_helper.to_array(init).dtype)
            if not np.array_equal(value, numpy_helper.to_array(init)):
                extra.append(numpy_helper.from_array(value, init.name + FLOAT_BIAS_SUFFIX))
    proto.graph.initializer.extend(extra)


def quantize_ptq(model: nn.Module, calib_images: torch.Tensor, onnx_path: Path, input_shape: tuple[int, int, int], *,
                 subset_size: int = 300, batch_size: int = 32, opset: int = 17,
                 finetune: Callable[[nn.Module], dict] | None = None) -> dict:
    """Calibrate an INT8 copy of `model` with NNCF on `calib_images` and write it as a QDQ ONNX file.

    subset_size  -- calibration images used (the first `subset_size` of `calib_images`)
    batch_size   -- images per calibration forward pass
    finetune     -- quantization-aware training: called with the calibrated fake-quantized model
                    (already on TensorRT's signed int8 grid) before export; returns its metrics
    The caller's model is not modified. Returns facts about the result for the manifest.
    """
    start = time.perf_counter()
    proto, info = nncf_qdq(model, calib_images, input_shape, subset_size=subset_size, batch_size=batch_size,
                           opset=opset, finetune=finetune)
    return {"onnx": str(onnx_path), **write_qdq(proto, onnx_path), **info,
            "seconds": round(time.perf_counter() - start, 3)}


# ---------------------------------------------------------------------------- backend 2: ONNX Runtime

# calibrate_method -> ONNX Runtime calibrator and its settings. Entropy gets TensorRT's histogram
# (2048 bins searched for the best 128-level window, as in the GTC 2017 talk ORT cites): with
# quantize_static's defaults (128 bins for 128 levels) the search has one candidate, the full range,
# and "entropy" silently equals min-max. Ranges are symmetric because the activations are.
CALIBRATORS = {
    "minmax": ("MinMax", {"symmetric": True}),
    "entropy": ("Entropy", {"symmetric": True, "num_bins": 2048, "num_quantized_bins": 128}),
    "percentile": ("Percentile", {"symmetric": True, "num_bins": 2048, "percentile": 99.999}),
}


@contextlib.contextmanager
def _quiet_ort():
    """quantize_static logs a pre-processing hint on the root logger and the histogram calibrators print
    their settings; the exporter already folded BatchNorm and constants, which that pre-processing adds."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)


def ort_qdq(fp32_onnx: bytes | str | os.PathLike, calib_images: torch.Tensor, *, subset_size: int = 300,
            batch_size: int = 32, calibrate_method: str = "minmax") -> tuple[object, dict]:
    """ONNX Runtime static quantization of an FP32 ONNX model into the same QDQ form as `nncf_qdq`.

    Calibration runs through ORT's `create_calibrator` (settings in CALIBRATORS) and reaches
    `quantize_static` as its calibration cache. `quantize_static(QuantFormat.QDQ, per_channel=True)`
    then uses int8 weights and activations, and:
      ActivationSymmetric, WeightSymmetric -- symmetric ranges, so every zero point is int8 0
          (TensorRT's explicit quantization takes nothing else);
      QuantizeBias=False -- biases stay float: ORT's default int32 bias DequantizeLinear is not an
          input TensorRT's ONNX parser takes (onnxruntime issue 17738), and NNCF keeps them float too;
      AddQDQPairToWeight -- weights stay float behind a Q/DQ pair until `write_qdq` folds them, so the
          sensitivity sweep can put any layer back in float;
      OpTypesToExcludeOutputQuantization=[Conv, Gemm, MatMul] -- Q/DQ on the inputs of the weighted
          ops (and of Add, pooling), not on their raw outputs: a pre-ReLU tensor is not quantized twice
          and the logits stay float, the placement NNCF uses and TensorRT fuses across.
    """
    import onnx
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          create_calibrator, quantize_static, save_tensors_data)

    start = time.perf_counter()
    if not isinstance(fp32_onnx, (bytes, bytearray)):
        fp32_onnx = Path(fp32_onnx).read_bytes()
    model = onnx.load_from_string(bytes(fp32_onnx))
    images = calib_images[:subset_size].detach().cpu().float()
    if len(images) == 0:
        raise ValueError("quantization needs at least one calibration image")
    input_name = model.graph.input[0].name
    batches = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]

    class Reader(CalibrationDataReader):
        def __init__(self):
            self._batches = iter(batches)

        def get_next(self):
            batch = next(self._batches, None)
            return None if batch is None else {input_name: batch}

    method_name, calib_options = CALIBRATORS[calibrate_method]
    method = getattr(CalibrationMethod, method_name)
    with tempfile.TemporaryDirectory(prefix="compress-ort-") as tmp, _quiet_ort():
        tmp = Path(tmp)
        (tmp / "fp32.onnx").write_bytes(bytes(fp32_onnx))
        calibrator = create_calibrator(tmp / "fp32.onnx", augmented_model_path=str(tmp / "augmented.onnx"),
                                       calibrate_method=method, extra_options=calib_options)
        calibrator.collect_data(Reader())
        save_tensors_data(calibrator.compute_data(), tmp / "ranges.json")
        del calibrator
        quantize_static(model, tmp / "int8.onnx", None, quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QInt8, weight_type=QuantType.QInt8, calibrate_method=method,
                        calibration_cache_path=tmp / "ranges.json",
                        extra_options={"ActivationSymmetric": True, "WeightSymmetric": True, "QuantizeBias": False,
                                       "AddQDQPairToWeight": True,
                                       "OpTypesToExcludeOutputQuantization": ["Conv", "Gemm", "MatMul"]})
        proto = onnx.load(str(tmp / "int8.onnx"))
    return proto, {
        "backend": "onnxruntime",
        "opset": next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), None),
        "calibrate_method": calibrate_method,
        "calibration_images": len(images),
        "calibration_batches": len(batches),
        "calibration_seconds": round(time.perf_counter() - start, 3),
        "onnxruntime_version": onnxruntime.__version__,
    }


def quantize_ort(fp32_onnx: bytes | str | os.PathLike, calib_images: torch.Tensor, onnx_path: Path, *,
                 subset_size: int = 300, batch_size: int = 32, calibrate_method: str = "minmax") -> dict:
    """`ort_qdq`, written as a QDQ ONNX file like `quantize_ptq`'s; returns facts for the manifest."""
    start = time.perf_counter()
    proto, info = ort_qdq(fp32_onnx, calib_images, subset_size=subset_size, batch_size=batch_size,
                          calibrate_method=calibrate_method)
    return {"onnx": str(onnx_path), **write_qdq(proto, onnx_path), **info,
            "seconds": round(time.perf_counter() - start, 3)}


# ----------------------------------------------------------------------------- stage


def run(cfg, ctx):
    """INT8 of the parent model (NNCF, or ONNX Runtime on its FP32 ONNX) calibrated on a seeded train or val
    subset; for `qat`, fine-tuned with KD on the fake-quantized grid; with `max_accuracy_drop`, the most
    sensitive layers kept float until the val accuracy is close enough. Writes the QDQ ONNX and layers.md/json."""
    from compress.context import Artifact, StageError
    from compress.stages import _sensitivity as sens

    data, parent = ctx.data, ctx.inputs[0]
    for needs_val, what in ((cfg.calibration_split == "val", "calibration_split: val"),
                            (cfg.max_accuracy_drop is not None, "max_accuracy_drop (judged on val)")):
        if needs_val and not data.num_val:
            raise StageError(f"stage {ctx.stage_name!r}: {what} needs a validation split, but data.val_size is 0")
    model = ctx.load_model(parent).eval().cpu()
    calib = data.calibration_subset(cfg.calibration_split, cfg.calibration_size, cfg.calibration_seed).cpu()
    path = ctx.stage_dir / "model_int8.onnx"
    start = time.perf_counter()
    if cfg.backend == "onnxruntime":
        fp32 = parent.path("onnx")  # the parent's exported FP32 model; exported here when there is none
        source = fp32 if fp32 is not None and fp32.is_file() else export_bytes(model, ctx.input_shape(), 17)
        proto, info = ort_qdq(source, calib, subset_size=cfg.calibration_size, calibrate_method=cfg.calibrate_method)
    else:
        finetune = None
        if cfg.method == "qat":
            from compress.losses import KDLoss
            from compress.training import fit

            teachers = [ctx.load_model(a) for a in ctx.teachers]

            def finetune(qmodel: nn.Module) -> dict:
                return fit(qmodel, data, cfg, cfg.epochs, device=ctx.device, teachers=teachers,
                           kd_loss=KDLoss(cfg.temperature, cfg.alpha, cfg.label_smoothing), log=ctx.log,
                           progress=ctx.progress, desc=f"{ctx.stage_name} (qat)")

        proto, info = nncf_qdq(model, calib, ctx.input_shape(), subset_size=cfg.calibration_size, finetune=finetune)

    # Scored against the FP32 parent on val (train when there is no val split; then agreement only).
    split = "val" if data.num_val else "train"
    scorer = sens.Scorer.of_model(lambda: data.eval_batches(split), model)
    layers = sens.find_layers(proto)
    decision = sens.accuracy_aware(proto, layers, scorer, max_drop=cfg.max_accuracy_drop,
                                   sweep_images=cfg.sensitivity_images, max_float_fraction=cfg.max_float_fraction,
                                   always_sweep=cfg.sensitivity_sweep, log=lambda m: ctx.log(f"[{ctx.stage_name}] {m}"))
    by_name = {layer.name: layer for layer in layers}
    final = sens.keep_float(proto, [by_name[n] for n in decision["kept_float"]])
    info = {**write_qdq(final, path), **info, "seconds": round(time.perf_counter() - start, 3)}

    final_score = decision["final"]
    summary = {"stage": ctx.stage_name, "backend": cfg.backend, "method": cfg.method,
               "calibration_split": cfg.calibration_split, "calibration_seed": cfg.calibration_seed,
               "calibration_images": info["calibration_images"], "eval_split": split, "images": scorer.n,
               "fp32_accuracy": scorer.fp32_accuracy if split == "val" else None,
               "int8_accuracy": decision["int8_accuracy"] if split == "val" else None,
               "final_accuracy": final_score["accuracy"] if split == "val" else None,
               "max_accuracy_drop": cfg.max_accuracy_drop, "target_met": decision["target_met"],
               "kept_float": decision["kept_float"], "sweep_ran": decision["sensitivity"] is not None,
               "sweep_reason": decision["sweep_reason"], "sweep_images": decision["sweep_images"],
               "max_float_layers": decision["max_float_layers"], "greedy": decision["greedy"]}
    rows = sens.layer_rows(layers, decision)
    layers_json, layers_md = sens.write_layer_report(ctx.stage_dir, summary, rows)

    info.update({
        "quantized_layers": len(layers),
        "kept_float_layers": decision["kept_float"],
        "val_accuracy_fp32": summary["fp32_accuracy"],
        "val_accuracy_int8_all_layers": summary["int8_accuracy"],
        "val_accuracy": summary["final_accuracy"],
        "val_accuracy_drop": (None if split != "val" else round(scorer.fp32_accuracy - final_score["accuracy"], 4)),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "accuracy_target_met": decision["target_met"],
        "sensitivity_sweep": summary["sweep_ran"],
        "calibration_split": cfg.calibration_split,
        "calibration_seed": cfg.calibration_seed,
        "top1_agreement_with_fp32": final_score["agreement"],
    })
    if decision["target_met"] is False:
        ctx.log(f"[{ctx.stage_name}] WARNING: max_accuracy_drop {cfg.max_accuracy_drop} was not reached with up to "
                f"{decision['max_float_layers']} of {len(layers)} layers in float; shipping the best found "
                f"({final_score['accuracy']:.2f}% vs FP32 {scorer.fp32_accuracy:.2f}% on val, "
                f"{len(decision['kept_float'])} layers float)")
    acc = (f"val top-1 {final_score['accuracy']:.2f}% (FP32 {scorer.fp32_accuracy:.2f}%), " if split == "val" else "")
    ctx.log(f"[{ctx.stage_name}] INT8 QDQ ONNX ({cfg.backend}): {info['quantize_linear']} Q / "
            f"{info['dequantize_linear']} DQ nodes, {info['calibration_images']} {cfg.calibration_split} calibration "
            f"images, {acc}top-1 agreement with FP32 {final_score['agreement'] * 100:.1f}%, "
            f"{len(decision['kept_float'])} of {len(layers)} layers kept float")
    return Artifact(name=ctx.stage_name, stage="quantize", parent=parent.name, model=parent.model,
                    files={"onnx_int8": str(path), "layers": str(layers_md), "layers_json": str(layers_json)},
                    params=parent.params, macs=parent.macs, precision="int8",
                    metrics={**info, "teachers": parent.metrics.get("teachers", [])})
