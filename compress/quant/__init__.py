"""INT8 quantization (NNCF or ONNX Runtime), written as a QDQ ONNX model TensorRT accepts.

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
so `sensitivity` can keep chosen layers in float (accuracy-aware PTQ, `max_accuracy_drop`)
and write the per-layer report; then `write_qdq` folds, checks and writes the file.
"""

from compress.quant.nncf_ptq import fold_batchnorm, nncf_qdq, quantize_ptq
from compress.quant.ort_ptq import CALIBRATORS, ort_qdq, quantize_ort
from compress.quant.qdq import qdq_zero_points, write_qdq

__all__ = ["CALIBRATORS", "fold_batchnorm", "nncf_qdq", "ort_qdq", "qdq_zero_points", "quantize_ort", "quantize_ptq",
           "write_qdq"]
