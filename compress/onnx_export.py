"""PyTorch to ONNX, and proof that the export computes what the model computes.

The ONNX file is what every later stage (ONNX Runtime benchmark, TensorRT engine build)
consumes, so an export is only accepted after `onnx.checker` passes; `check_parity` then
compares it with PyTorch on real images (largest logit difference and top-1 agreement).

Exporter choice. torch 2.13 still ships both ONNX exporters: the default
`torch.export`-based one (`dynamo=True`) and the TorchScript tracer (`dynamo=False`,
deprecated but present). For the feed-forward conv nets this project exports we use the
TorchScript tracer, because on this code it is measurably better:
  * it honours `opset_version=17`; the dynamo exporter has no opset-17 implementations, emits
    opset 18, and its down-conversion to 17 fails (ReduceMean `axes` input), leaving an
    opset-18 file that TensorRT 8.x's parser (opsets up to 17) refuses;
  * it folds eval-mode BatchNorm into the preceding Conv and maps global pooling to
    GlobalAveragePool, giving the same graph TensorRT expects;
  * it takes ~0.05 s on a small CNN where the dynamo path takes ~2.5 s (torch.export,
    decompositions, onnxscript optimisation);
  * NNCF's quantizers only turn into QuantizeLinear/DequantizeLinear pairs under TorchScript
    tracing, so the INT8 export in `quantize.py` must use this exporter anyway; using the same
    one for FP32 keeps the two graphs comparable node for node.
Should a future torch drop `dynamo=False`, `export_bytes` is the single place to change.
"""

from __future__ import annotations

import io
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from compress.io import atomic_write_bytes

INPUT_NAME = "input"
OUTPUT_NAME = "logits"
DYNAMIC_AXES = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}


def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def export_bytes(model: nn.Module, input_shape: tuple[int, int, int], opset: int = 17) -> bytes:
    """Trace `model` (already in eval mode) with a batch of one; the batch axis is left symbolic.

    Also the quantize stage's exporter: NNCF's quantizers become QuantizeLinear/DequantizeLinear
    pairs only under this (TorchScript) tracer.
    """
    dummy = torch.zeros(1, *input_shape, device=_model_device(model))
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        # The tracer's deprecation notice is expected (see module docstring), and tracer
        # warnings about Python constants are about shapes we deliberately fix (all but batch).
        warnings.filterwarnings("ignore", message=re.escape("You are using the legacy TorchScript-based ONNX export"))
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        torch.onnx.export(
            model,
            (dummy,),
            buf,
            dynamo=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_axes=DYNAMIC_AXES,
            opset_version=opset,
            do_constant_folding=True,  # folds eval-mode BatchNorm into Conv weights
        )
    return buf.getvalue()


def export_onnx(model: nn.Module, path: Path, input_shape: tuple[int, int, int], opset: int = 17) -> Path:
    """Write `model` as ONNX (input "input" [N,C,H,W], output "logits" [N,K], N dynamic).

    The file is built in memory, checked, and only then written atomically: a failed export
    leaves no file (or the previous one) behind. The model's train/eval mode is restored.
    """
    import onnx

    path = Path(path)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            data = export_bytes(model, tuple(input_shape), opset)
    finally:
        model.train(was_training)
    onnx.checker.check_model(onnx.load_from_string(data))
    return atomic_write_bytes(path, data)


def constant_values(graph) -> dict:
    """Every constant tensor of an ONNX graph by name: its initializers and Constant nodes' values."""
    from onnx import numpy_helper

    values = {init.name: numpy_helper.to_array(init) for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    values[node.output[0]] = numpy_helper.to_array(attr.t)
    return values


def onnx_session(path: str | os.PathLike, threads: int | None = None):
    """An ONNX Runtime CPU session with all graph optimisations on.

    `threads` sets the intra-op thread pool (None: ONNX Runtime's default, one per physical core).
    """
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.intra_op_num_threads = int(threads) if threads else 0
    opts.inter_op_num_threads = 1  # conv nets are one chain of ops; a second pool only adds contention
    opts.log_severity_level = 3    # errors only; ORT's cost-model warnings are noise here
    return ort.InferenceSession(str(path), sess_options=opts, providers=["CPUExecutionProvider"])


def check_parity(model: nn.Module, onnx_path: Path, images: torch.Tensor, batch_size: int = 64) -> dict:
    """Run the same images through PyTorch and ONNX Runtime; compare logits and top-1."""
    session = onnx_session(onnx_path)
    input_name = session.get_inputs()[0].name
    device = _model_device(model)
    was_training = model.training
    model.eval()
    max_abs_diff, agree, n = 0.0, 0, 0
    try:
        with torch.no_grad():
            for start in range(0, len(images), batch_size):
                batch = images[start:start + batch_size].float()
                ref = model(batch.to(device)).float().cpu()
                out = torch.from_numpy(session.run(None, {input_name: batch.cpu().numpy()})[0]).float()
                max_abs_diff = max(max_abs_diff, (ref - out).abs().max().item())
                agree += (ref.argmax(1) == out.argmax(1)).sum().item()
                n += len(batch)
    finally:
        model.train(was_training)
    return {"max_abs_diff": max_abs_diff, "top1_agreement": agree / n if n else float("nan"), "n": n}
