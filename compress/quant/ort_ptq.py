"""Backend 2: ONNX Runtime static quantization of an FP32 ONNX model into the same QDQ form as NNCF's."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import tempfile
import time
from pathlib import Path

import torch

from compress.quant.qdq import write_qdq


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
    import onnxruntime

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    # The calibrators' own sessions warn once per unused initializer (tens of lines per model, on
    # stderr, from C++); errors only while we quantize, then ORT's default (warning) again.
    onnxruntime.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        root.setLevel(level)
        onnxruntime.set_default_logger_severity(2)


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

