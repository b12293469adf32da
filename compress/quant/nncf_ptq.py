"""Backend 1: NNCF post-training INT8 (and the QAT hook) on the PyTorch model, as a QDQ ONNX graph.

Steps 1-4 of compress.quant's recipe: fold BatchNorm, `nncf.quantize(preset=PERFORMANCE)`, flip
unsigned activation quantizers to signed int8, export Q/DQ pairs; `write_qdq` does step 5.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import math
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from torch import nn

from compress.onnx_export import export_bytes
from compress.quant.qdq import write_qdq


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
    bias from before NNCF rides along (see sensitivity.FLOAT_BIAS_SUFFIX; `write_qdq` drops unused ones)."""
    from onnx import numpy_helper

    from compress.quant.sensitivity import FLOAT_BIAS_SUFFIX

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

