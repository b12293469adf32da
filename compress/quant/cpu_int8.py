"""The INT8 file CPU runtimes run fast: ONNX Runtime's integer kernels, and OpenVINO.

The TensorRT QDQ file (signed int8 activations with zero point 0, float biases, Q/DQ only on the
inputs of weighted ops) is what TensorRT's explicit quantization wants, and ONNX Runtime's CPU
provider cannot fuse it: a Conv whose output is not quantized and whose bias is float stays a
float Conv between DequantizeLinear nodes, slower than the FP32 model. ONNX Runtime's CPU kernels
want the form `quantize_static` writes by default (its docs: "QDQ, U8S8" on x86-64 with AVX2):

* uint8 activations (asymmetric), int8 weights per output channel: the AVX2/VNNI u8s8 GEMM;
* every Conv/Gemm output quantized too, so DQ -> Conv -> Q becomes one QLinearConv (a ReLU
  in between is absorbed by the output's range);
* int32 biases (scale = input scale x weight scale), which the fused kernel adds in integers;
* 7-bit weights (`reduce_range`): without VNNI, x86's u8s8 kernels (AVX2 vpmaddubsw) add pairs of
  products in int16 and saturate. Measured on this AVX2 machine: with 8-bit weights ONNX Runtime's
  fused kernels agreed with the file's own QDQ arithmetic on 81% of a tiny net's decisions (max
  logit error 0.21) while OpenVINO agreed on 100%; ORT's docs give the same advice for non-VNNI CPUs.

OpenVINO reads QDQ ONNX directly and runs the quantized layers in int8 (its LPT transformations);
which of the two files it runs faster was measured, not assumed (see benchmarks/int8_cpu.py).

"From one calibration": the same calibration images (split, seed, count) and the same calibrator
as the stage's TensorRT file; ORT's calibrators then compute the ranges this form needs.
"""

from __future__ import annotations

import os
import tempfile
import time
from pathlib import Path

import torch

from compress.io import atomic_write_bytes
from compress.quant.ort_ptq import CALIBRATORS, _quiet_ort

CPU_FILE = "model_int8_cpu.onnx"


def cpu_qdq(fp32_onnx: bytes | str | os.PathLike, calib_images: torch.Tensor, out_path: Path, *,
            subset_size: int = 300, batch_size: int = 32, calibrate_method: str = "minmax") -> dict:
    """Write ONNX Runtime's CPU INT8 form of an FP32 ONNX model (QDQ, U8S8, per-channel, int32 biases).

    Returns facts for the manifest: the file, the format, calibration images and seconds.
    """
    import onnxruntime
    from onnxruntime.quantization import (CalibrationDataReader, CalibrationMethod, QuantFormat, QuantType,
                                          quantize_static)

    start = time.perf_counter()
    if not isinstance(fp32_onnx, (bytes, bytearray)):
        fp32_onnx = Path(fp32_onnx).read_bytes()
    images = calib_images[:subset_size].detach().cpu().float()
    if len(images) == 0:
        raise ValueError("quantization needs at least one calibration image")
    batches = [images[i:i + batch_size].numpy() for i in range(0, len(images), batch_size)]
    method_name = CALIBRATORS[calibrate_method][0]  # ranges asymmetric here: uint8 activations use them whole

    with tempfile.TemporaryDirectory(prefix="compress-cpu-int8-") as tmp, _quiet_ort():
        tmp = Path(tmp)
        (tmp / "fp32.onnx").write_bytes(_inline_shared_constants(bytes(fp32_onnx)))
        input_name = onnxruntime.InferenceSession(str(tmp / "fp32.onnx"),
                                                  providers=["CPUExecutionProvider"]).get_inputs()[0].name

        class Reader(CalibrationDataReader):
            def __init__(self):
                self._batches = iter(batches)

            def get_next(self):
                batch = next(self._batches, None)
                return None if batch is None else {input_name: batch}

        quantize_static(str(tmp / "fp32.onnx"), str(tmp / "int8.onnx"), Reader(), quant_format=QuantFormat.QDQ,
                        per_channel=True, reduce_range=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                        calibrate_method=getattr(CalibrationMethod, method_name),
                        extra_options={"CalibTensorRangeSymmetric": False})
        data = (tmp / "int8.onnx").read_bytes()
    atomic_write_bytes(Path(out_path), data)
    return {"onnx_int8_cpu": str(out_path), "format": "QDQ U8S8 per-channel (7-bit weights), int32 bias",
            "calibration_images": len(images), "calibrate_method": calibrate_method,
            "seconds": round(time.perf_counter() - start, 3), "onnxruntime_version": onnxruntime.__version__}


def _inline_shared_constants(data: bytes) -> bytes:
    """Give every Conv/Gemm its own bias and weight initializers.

    The tracer stores equal constants once and reads the copies through Identity nodes (BatchNorm
    folding makes equal biases common). quantize_static quantizes a bias only when it is an
    initializer, so a bias behind an Identity stays float and ONNX Runtime cannot fuse that Conv
    into a QLinearConv (measured: 18 of ResNet-20's 21 convolutions stayed float).
    """
    import onnx

    model = onnx.load_from_string(data)
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    aliases = [n for n in graph.node if n.op_type == "Identity" and n.input[0] in inits]
    if not aliases:
        return data
    for node in aliases:
        copy = onnx.TensorProto()
        copy.CopyFrom(inits[node.input[0]])
        copy.name = node.output[0]
        graph.initializer.append(copy)
        graph.node.remove(node)
    return model.SerializeToString()


def write_cpu_form(fp32_onnx: bytes | str | os.PathLike, calib_images: torch.Tensor, out_path: Path, *,
                   eval_batches, fp32_accuracy: float | None, max_drop: float = 0.3, subset_size: int = 300,
                   calibrate_method: str = "minmax", log=print) -> dict:
    """`cpu_qdq`, scored with ONNX Runtime on `eval_batches` against the FP32 parent's accuracy.

    A form that loses more than `max_drop` top-1 points (at least one image's worth on a small
    split) is not kept (the file is removed and `shipped` is false): CPU runtimes then run the
    TensorRT QDQ file, slower but within its target.
    """
    from compress.runtime import OrtRunner, evaluate

    info = cpu_qdq(fp32_onnx, calib_images, out_path, subset_size=subset_size, calibrate_method=calibrate_method)
    scored = evaluate(OrtRunner(out_path, "int8", threads=None), eval_batches())
    acc = scored["accuracy"]
    drop = None if fp32_accuracy is None else round(fp32_accuracy - acc, 4)
    # On a small val split one image is worth more than the limit: allow at least one image's flip.
    max_drop = max(max_drop, round(100.0 / scored["n"], 4))
    shipped = drop is None or drop <= max_drop
    if not shipped:
        Path(out_path).unlink(missing_ok=True)
        log(f"CPU INT8 form not kept: {acc:.2f}% top-1, {drop:.2f} points under FP32 (limit {max_drop})")
    else:
        versus = "" if drop is None else (f", {drop:.2f} points under FP32" if drop >= 0
                                          else f", {-drop:.2f} points above FP32")
        log(f"CPU INT8 form (QDQ u8s8, int32 bias): {acc:.2f}% top-1{versus}")
    return {**info, "accuracy": round(acc, 4), "accuracy_drop": drop, "max_drop": max_drop, "shipped": shipped}
