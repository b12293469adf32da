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

import numpy as np
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
    return portable_channel_gathers(buf.getvalue())


def _is_shuffle(index, groups: int) -> bool:
    c = len(index)
    return c % groups == 0 and (index == np.arange(c).reshape(groups, c // groups).T.reshape(-1)).all()


def portable_channel_gathers(data: bytes) -> bytes:
    """Rewrite every channel shuffle exported as ``Gather(x, indices, axis=1)`` as Reshape/Transpose/Reshape.

    Why: OpenVINO (2026.4 CPU) folds a constant channel Gather into the Conv that reads it and
    gets the permutation wrong: a 1x1 Conv after a shuffle computes garbage (the pruned
    ShuffleNetV2 scored 9.8% top-1 there against 88% in ONNX Runtime). A shuffle as
    reshape [N, g, C/g, HW] -> transpose -> reshape back is the form every runtime reads alike
    (OpenVINO fuses it into its own ShuffleChannels). The tracer computes a shuffle's indices
    from the input's shape (Shape -> Range -> Reshape -> Transpose); they are evaluated once with
    ONNX Runtime, at two batch sizes to prove they do not depend on the batch. Graphs without
    such a Gather come back unchanged.
    """
    import onnx
    from onnx import helper, numpy_helper

    model = onnx.load_from_string(data)
    graph = model.graph
    consts = constant_values(graph)
    gathers = [n for n in graph.node if n.op_type == "Gather" and n.input[1] not in consts
               and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    if not gathers:
        return data
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    del probe.graph.output[:]
    for n in gathers:
        probe.graph.output.append(onnx.ValueInfoProto(name=n.input[1]))
    import onnxruntime as ort

    session = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"])
    inp = session.get_inputs()[0]
    shape = [d if isinstance(d, int) else 1 for d in inp.shape]
    values = [session.run(None, {inp.name: np.zeros([b] + shape[1:], np.float32)}) for b in (1, 2)]
    changed = False
    for n, idx, idx2 in zip(gathers, *values):
        if idx.ndim != 1 or not np.array_equal(idx, idx2):
            continue
        groups = next((g for g in (2, 3, 4, 8) if _is_shuffle(idx, g)), None)
        if groups is None:
            continue
        c, x, y = len(idx), n.input[0], n.output[0]
        p = n.name or y
        graph.initializer.append(numpy_helper.from_array(
            np.array([0, groups, c // groups, -1], np.int64), f"{p}/shuffle_shape"))
        new = [helper.make_node("Reshape", [x, f"{p}/shuffle_shape"], [f"{p}/grouped"], name=f"{p}/Reshape"),
               helper.make_node("Transpose", [f"{p}/grouped"], [f"{p}/swapped"], perm=[0, 2, 1, 3],
                                name=f"{p}/Transpose"),
               helper.make_node("Shape", [x], [f"{p}/in_shape"], name=f"{p}/Shape"),
               helper.make_node("Reshape", [f"{p}/swapped", f"{p}/in_shape"], [y], name=f"{p}/Reshape_back")]
        at = list(graph.node).index(n)
        graph.node.remove(n)
        for k, node in enumerate(new):
            graph.node.insert(at + k, node)
        changed = True
    if not changed:
        return data
    _drop_dead_nodes(graph)
    return model.SerializeToString()


def _drop_dead_nodes(graph) -> None:
    """Remove nodes (and initializers) nothing reads any more, e.g. the index arithmetic of a rewritten Gather."""
    while True:
        used = {o.name for o in graph.output} | {i for n in graph.node for i in n.input}
        dead = [n for n in graph.node if not any(o in used for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    for init in [i for i in graph.initializer if i.name not in used]:
        graph.initializer.remove(init)


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
