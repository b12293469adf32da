"""INT8 -> QDQ ONNX that TensorRT accepts (signed int8, zero points 0, per-channel weights) and that
still agrees with the FP32 model, from both backends (NNCF, ONNX Runtime); accuracy-aware PTQ (the
per-layer sensitivity sweep and the greedy choice of float layers); the stage end to end with its
calibration-split rules and layers report."""

from __future__ import annotations

import contextlib
import copy
import json
import math
import re

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from compress.quant import sensitivity as sens
from compress.onnx_export import check_parity, export_bytes, export_onnx, onnx_session
from compress.quant import (fold_batchnorm, nncf_qdq, ort_qdq, qdq_zero_points,
                            quantize_ort, quantize_ptq, write_qdq)
from tests.conftest import TinyNet

INPUT_SHAPE = (3, 24, 24)
NUM_CLASSES = 4


def synthetic(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Class = (stripe orientation: horizontal/vertical) x (tint: red/green), random phase, on noise.

    Both cues are local, so a small receptive field followed by global pooling can learn them.
    """
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    coords = torch.arange(INPUT_SHAPE[1], dtype=torch.float32)
    phase = 2 * math.pi * torch.rand(n, 1, generator=g)
    wave = torch.sin(2 * math.pi * coords / 6 + phase)                    # [n, size]
    vertical = (labels % 2 == 1).view(n, 1, 1)
    stripes = torch.where(vertical, wave[:, None, :], wave[:, :, None])   # [n, size, size]
    tint = torch.zeros(n, 3, 1, 1)
    tint[torch.arange(n), labels // 2] = 1.0
    images = 0.5 * torch.randn(n, *INPUT_SHAPE, generator=g) + stripes[:, None] * (0.3 + tint)
    return images, labels


@contextlib.contextmanager
def one_thread():
    """Tiny models gain nothing from intra-op threads, and on a busy 2-core runner two
    spinning threads make training ~10x slower (measured); restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_tiny(steps: int = 60) -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet()
    images, labels = synthetic(512, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (64,), generator=g)
        loss = F.cross_entropy(model(images[idx]), labels[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@pytest.fixture(scope="module")
def ptq(tmp_path_factory):
    out = tmp_path_factory.mktemp("quantize")
    with one_thread():
        model = train_tiny()
        state_before = copy.deepcopy(model.state_dict())
        calib, _ = synthetic(128, seed=1)
        info = quantize_ptq(model, calib, out / "int8.onnx", INPUT_SHAPE, subset_size=96, batch_size=32)
        fp32 = export_onnx(model, out / "fp32.onnx", INPUT_SHAPE)
    return {"model": model, "state_before": state_before, "info": info, "int8": out / "int8.onnx", "fp32": fp32}


def test_fp32_model_learned_the_task(ptq):
    images, labels = synthetic(256, seed=2)
    with torch.no_grad():
        pred = ptq["model"](images).argmax(1)
    assert (pred == labels).float().mean() > 0.8
    assert len(pred.unique()) == NUM_CLASSES  # not a degenerate classifier


def test_caller_model_untouched(ptq):
    model = ptq["model"]
    after = model.state_dict()
    assert after.keys() == ptq["state_before"].keys()
    assert all(torch.equal(after[k], v) for k, v in ptq["state_before"].items())
    assert "forward" not in model.__dict__  # no NNCF hook wrapper installed on the caller's model
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 4


def test_info(ptq):
    info = ptq["info"]
    assert info["calibration_images"] == 96 and info["calibration_batches"] == 3
    assert info["quantize_linear"] > 0 and info["dequantize_linear"] > info["quantize_linear"]
    assert info["bn_folded"] == 4
    assert info["weight_dequantize_linear"] == 5  # 4 convs + the linear head
    assert info["weight_dequantize_per_channel"] == 5
    assert info["activations_made_signed"] > 0  # post-ReLU tensors came out of NNCF unsigned


def test_qdq_nodes_and_no_batchnorm(ptq):
    proto = onnx.load(str(ptq["int8"]))
    onnx.checker.check_model(proto)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("QuantizeLinear") >= 4 and ops.count("DequantizeLinear") >= 9
    assert "BatchNormalization" not in ops


@pytest.mark.parametrize("batch", [1, 7])
def test_int8_runs_in_onnxruntime_with_dynamic_batch(ptq, batch):
    session = onnx_session(ptq["int8"], threads=1)
    out = session.run(None, {"input": torch.randn(batch, *INPUT_SHAPE).numpy()})[0]
    assert out.shape == (batch, NUM_CLASSES)
    assert np.isfinite(out).all()


def test_all_zero_points_are_int8_zero(ptq):
    zps = qdq_zero_points(ptq["int8"])
    assert zps and all(z == 0 for z in zps)
    proto = onnx.load(str(ptq["int8"]))
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    for n in proto.graph.node:
        if n.op_type in ("QuantizeLinear", "DequantizeLinear"):
            assert len(n.input) == 3, f"{n.name}: omitted zero point means uint8"
            assert consts[n.input[2]].dtype == np.int8, n.name


def test_weights_are_int8_per_channel(ptq):
    proto = onnx.load(str(ptq["int8"]))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    consts = dict(inits)
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    weight_dq = [n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] in inits]
    assert len(weight_dq) == 5
    for n in weight_dq:
        w = inits[n.input[0]]
        axis = next((a.i for a in n.attribute if a.name == "axis"), 1)
        assert w.dtype == np.int8, n.name
        assert axis == 0, n.name
        assert consts[n.input[1]].shape == (w.shape[0],), n.name  # one scale per output channel
    assert not any(v.dtype == np.float32 and v.ndim >= 2 for v in inits.values())  # no float weights left


def test_int8_weights_take_a_quarter_of_the_bytes(ptq):
    # Whole-file size is dominated by graph structure for a model this small, so compare the
    # weight tensors themselves (>= 2-D initializers); on real models the file shrinks ~4x too.
    def weight_bytes(path):
        return sum(numpy_helper.to_array(i).nbytes for i in onnx.load(str(path)).graph.initializer if len(i.dims) >= 2)

    assert weight_bytes(ptq["int8"]) * 4 == weight_bytes(ptq["fp32"])


def test_int8_agrees_with_fp32(ptq):
    held_out, _ = synthetic(200, seed=3)
    parity = check_parity(ptq["model"], ptq["int8"], held_out)
    assert parity["n"] == 200
    assert parity["top1_agreement"] >= 0.9


def test_bare_sequential_is_accepted(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, NUM_CLASSES)).eval()
    with one_thread():
        info = quantize_ptq(model, torch.randn(16, *INPUT_SHAPE), tmp_path / "seq.onnx", INPUT_SHAPE, batch_size=8)
    assert info["bn_folded"] == 1 and info["calibration_batches"] == 2
    assert set(qdq_zero_points(tmp_path / "seq.onnx")) == {0}


def test_fold_batchnorm_preserves_outputs():
    with one_thread():
        model = train_tiny(steps=5)
    folded = copy.deepcopy(model)
    assert fold_batchnorm(folded) == 4
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    x = torch.randn(8, *INPUT_SHAPE)
    with torch.no_grad():
        torch.testing.assert_close(folded(x), model(x), atol=1e-5, rtol=1e-5)


# ----------------------------------------------------------------------------- shared checks


def qdq_nodes_are_tensorrt_int8(path) -> dict:
    """Assert every Q/DQ node has an explicit int8 zero point of 0; return the graph's constants."""
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    consts = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    for n in proto.graph.node:
        if n.op_type == "Constant":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    qdq = [n for n in proto.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert qdq
    for n in qdq:
        assert len(n.input) == 3, f"{n.name}: omitted zero point means uint8"
        zp = consts[n.input[2]]
        assert zp.dtype == np.int8 and not zp.any(), n.name
    return consts


@pytest.fixture(scope="module")
def trained():
    with one_thread():
        return train_tiny()


# ----------------------------------------------------------------------------- the ONNX Runtime backend


@pytest.fixture(scope="module")
def ort(tmp_path_factory, trained):
    out = tmp_path_factory.mktemp("ort")
    calib, _ = synthetic(128, seed=1)
    with one_thread():
        fp32 = export_onnx(trained, out / "fp32.onnx", INPUT_SHAPE)
        info = quantize_ort(fp32, calib, out / "int8.onnx", subset_size=96, batch_size=32)
    return {"info": info, "int8": out / "int8.onnx", "fp32": fp32, "calib": calib}


def test_ort_info(ort):
    info = ort["info"]
    assert info["backend"] == "onnxruntime" and info["calibrate_method"] == "minmax"
    assert info["calibration_images"] == 96 and info["calibration_batches"] == 3
    assert info["weight_dequantize_linear"] == info["weight_dequantize_per_channel"] == 5
    assert info["int8_weight_initializers"] == 5


@pytest.mark.parametrize("batch", [1, 7])
def test_ort_int8_runs_in_onnxruntime_with_dynamic_batch(ort, batch):
    out = onnx_session(ort["int8"], threads=1).run(None, {"input": torch.randn(batch, *INPUT_SHAPE).numpy()})[0]
    assert out.shape == (batch, NUM_CLASSES) and np.isfinite(out).all()


def test_ort_int8_is_tensorrt_shaped(ort):
    consts = qdq_nodes_are_tensorrt_int8(ort["int8"])
    proto = onnx.load(str(ort["int8"]))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    producers = {o: n for n in proto.graph.node for o in n.output}
    for n in proto.graph.node:
        if n.op_type not in ("Conv", "Gemm"):
            continue
        w_dq = producers[n.input[1]]
        assert w_dq.op_type == "DequantizeLinear" and inits[w_dq.input[0]].dtype == np.int8, n.name
        assert consts[w_dq.input[1]].shape == (inits[w_dq.input[0]].shape[0],), n.name  # per output channel
        assert inits[n.input[2]].dtype == np.float32, n.name  # bias float: no int32 DequantizeLinear
    assert not any(v.dtype == np.int32 for v in inits.values())
    assert producers["logits"].op_type == "Gemm"  # the logits are not quantized


def test_ort_int8_agrees_with_fp32(ort, trained):
    held_out, _ = synthetic(200, seed=3)
    assert check_parity(trained, ort["int8"], held_out)["top1_agreement"] >= 0.9


@pytest.mark.parametrize("method", ["entropy", "percentile"])
def test_ort_histogram_calibration_clips_ranges(ort, method):
    """Entropy and percentile pick activation ranges inside min-max's, some strictly (entropy with
    ONNX Runtime's own 128-bin default would equal min-max exactly; we give it 2048 bins)."""
    minmax, _ = ort_qdq(ort["fp32"], ort["calib"], subset_size=96)
    other, info = ort_qdq(ort["fp32"], ort["calib"], subset_size=96, calibrate_method=method)
    assert info["calibrate_method"] == method
    scale = lambda proto: {layer.name: float(layer.activation.scale) for layer in sens.find_layers(proto)}  # noqa: E731
    a, b = scale(minmax), scale(other)
    assert a.keys() == b.keys() and len(a) == 5
    assert all(b[k] <= a[k] * 1.0001 for k in a)
    assert any(b[k] < a[k] * 0.99 for k in a)


# ----------------------------------------------------------------------------- keeping layers float


@pytest.fixture(scope="module", params=["nncf", "onnxruntime"])
def unfolded(request, trained):
    """(backend, QDQ graph with weights still behind Q/DQ) of the trained tiny net."""
    calib, _ = synthetic(128, seed=1)
    with one_thread():
        if request.param == "nncf":
            proto, _ = nncf_qdq(trained, calib, INPUT_SHAPE, subset_size=96)
        else:
            proto, _ = ort_qdq(export_bytes(trained, INPUT_SHAPE, 17), calib, subset_size=96)
    return request.param, proto


LAYERS = ["/stem/stem.0/Conv", "/block/block.0/Conv", "/block/block.3/Conv", "/expand/expand.0/Conv", "/head/Gemm"]


def test_find_layers(unfolded):
    _, proto = unfolded
    layers = sens.find_layers(proto)
    assert [layer.name for layer in layers] == LAYERS
    for layer in layers:
        assert layer.weight is not None and layer.activation is not None, layer.name
        assert layer.weight.scale.shape == (layer.weight_shape[0],)  # per-channel weight scales
        assert layer.activation.scale.size == 1 and layer.activation.scale > 0
    assert layers[0].activation.float_tensor == "input"


def test_keep_float_rewires_only_that_layer(unfolded, trained, tmp_path):
    backend, proto = unfolded
    layers = {layer.name: layer for layer in sens.find_layers(proto)}
    edited = sens.keep_float(proto, [layers["/stem/stem.0/Conv"]])
    nodes = {n.name: n for n in edited.graph.node}
    inits = {i.name: numpy_helper.to_array(i) for i in edited.graph.initializer}
    stem = nodes["/stem/stem.0/Conv"]
    assert stem.input[0] == "input"  # reads the image itself, not a DequantizeLinear
    folded = copy.deepcopy(trained)
    fold_batchnorm(folded)
    np.testing.assert_allclose(inits[stem.input[1]], folded.stem[0].weight.detach().numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(inits[stem.input[2]], folded.stem[0].bias.detach().numpy(), rtol=1e-5, atol=1e-6)
    assert [layer.name for layer in sens.find_layers(edited)] == LAYERS[1:]  # the others are untouched
    assert sens.find_layers(proto)[0].name == LAYERS[0]             # and the input graph too
    info = write_qdq(edited, tmp_path / "one_float.onnx")
    assert info["weight_dequantize_linear"] == info["int8_weight_initializers"] == 4
    qdq_nodes_are_tensorrt_int8(tmp_path / "one_float.onnx")
    assert check_parity(trained, tmp_path / "one_float.onnx", synthetic(64, seed=3)[0])["top1_agreement"] >= 0.9


def test_nncf_bias_correction_is_undone_for_float_layers(trained):
    """NNCF moves biases to cancel the INT8 error; a layer put back in float must get the old bias back."""
    calib, _ = synthetic(128, seed=1)
    with one_thread():
        proto, _ = nncf_qdq(trained, calib, INPUT_SHAPE, subset_size=96)
    layers = sens.find_layers(proto)
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    corrected = [layer for layer in layers if layer.bias is not None]
    assert corrected  # fast bias correction moved at least one bias
    for layer in corrected:
        node = proto.graph.node[layer.bias.node]
        assert not np.array_equal(inits[node.input[2]], inits[layer.bias.float_tensor])


# ----------------------------------------------------------------------------- accuracy-aware PTQ


def with_outlier_input(model: TinyNet) -> TinyNet:
    """The same network on a 4th input channel it ignores (zero weights) that holds 1000 in every pixel.

    The float model is unchanged; one per-tensor int8 scale for the input now spans +-1000, so the real
    channels (|x| ~ 1) round to zero and INT8 falls to chance, unless the first conv stays float.
    """
    model = copy.deepcopy(model)
    old = model.stem[0]
    model.stem[0] = nn.Conv2d(4, 16, 3, stride=2, padding=1, bias=False)
    with torch.no_grad():
        model.stem[0].weight.zero_()
        model.stem[0].weight[:, :3] = old.weight
    return model.eval()


def outlier_images(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    x, y = synthetic(n, seed)
    return torch.cat([x, torch.full((n, 1, *INPUT_SHAPE[1:]), 1000.0)], 1), y


@pytest.mark.parametrize("backend", ["nncf", "onnxruntime"])
def test_accuracy_aware_keeps_the_sensitive_layer_float(backend, trained, tmp_path):
    model = with_outlier_input(trained)
    shape = (4, *INPUT_SHAPE[1:])
    calib, _ = outlier_images(96, seed=1)
    val, labels = outlier_images(200, seed=4)
    with one_thread():
        if backend == "nncf":
            proto, _ = nncf_qdq(model, calib, shape)
        else:
            proto, _ = ort_qdq(export_bytes(model, shape, 17), calib)
        scorer = sens.Scorer.of_model(lambda: ((val[i:i + 64], labels[i:i + 64]) for i in range(0, 200, 64)), model)
        layers = sens.find_layers(proto)
        decision = sens.accuracy_aware(proto, layers, scorer, max_drop=1.0, sweep_images=100, log=lambda m: None)
    assert scorer.fp32_accuracy >= 90
    assert decision.int8_accuracy < scorer.fp32_accuracy - 30  # the outlier wrecks plain INT8
    assert sens.rank(decision.sensitivity)[0] == "/stem/stem.0/Conv"
    assert decision.kept_float == ["/stem/stem.0/Conv"]
    assert decision.target_met is True
    assert decision.final["accuracy"] >= scorer.fp32_accuracy - 1.0
    assert [s["layers_float"] for s in decision.greedy] == [0, 1]

    rows = sens.layer_rows(layers, decision)
    summary = {"stage": "q", "backend": backend, "method": "ptq", "calibration_split": "train",
               "calibration_seed": 1, "calibration_images": 96, "eval_split": "val", "images": scorer.n,
               "fp32_accuracy": scorer.fp32_accuracy, "int8_accuracy": decision.int8_accuracy,
               "final_accuracy": decision.final["accuracy"], "max_accuracy_drop": 1.0, "target_met": True,
               "kept_float": decision.kept_float, "sweep_ran": True, "sweep_reason": decision.sweep_reason,
               "sweep_images": 100, "max_float_layers": decision.max_float_layers, "greedy": decision.greedy}
    json_path, md_path = sens.write_layer_report(tmp_path, summary, rows)
    report = json.loads(json_path.read_text())
    assert [r["name"] for r in report["layers"]] == LAYERS
    assert [r["kept_float"] for r in report["layers"]] == [True, False, False, False, False]
    assert report["layers"][0]["sensitivity"]["gain"] > 30
    assert report["layers"][0]["activation_scale"]["min"] > 1000 / 128  # the outlier set the input's scale
    md = md_path.read_text()
    assert "`/stem/stem.0/Conv`" in md and "**yes**" in md and "No sensitivity sweep" not in md


def test_no_sweep_without_a_reason(unfolded):
    _, proto = unfolded
    val, labels = synthetic(64, seed=4)
    layers = sens.find_layers(proto)
    scorer = sens.Scorer.of_model(lambda: [(val, labels)], lambda x: torch.zeros(len(x), NUM_CLASSES))
    decision = sens.accuracy_aware(proto, layers, scorer, max_drop=None, log=lambda m: None)
    assert decision.sensitivity is None and decision.kept_float == [] and decision.target_met is None
    assert decision.sweep_reason == "max_accuracy_drop not set"
    assert all(r["sensitivity"] is None and not r["kept_float"] for r in sens.layer_rows(layers, decision))


def fake_accuracy(table: dict[tuple, float], calls: list):
    def accuracy_of(names):
        calls.append(tuple(names))
        return table[tuple(names)]
    return accuracy_of


def test_greedy_floats_layers_in_order_until_the_drop_fits():
    table = {(): 80.0, ("a",): 85.0, ("a", "b"): 89.0, ("a", "b", "c"): 89.9}
    calls = []
    out = sens.choose_float(["a", "b", "c"], 90.0, 1.0, fake_accuracy(table, calls))
    assert out["kept_float"] == ["a", "b"] and out["met"] and out["accuracy"] == 89.0
    assert calls == [(), ("a",), ("a", "b")]  # stops as soon as the limit holds


def test_greedy_within_limit_floats_nothing():
    calls = []
    out = sens.choose_float(["a", "b"], 90.0, 1.0, fake_accuracy({(): 89.5}, calls))
    assert out["kept_float"] == [] and out["met"] and calls == [()]


def test_greedy_unreachable_keeps_the_best_and_says_so():
    table = {(): 70.0, ("a",): 75.0, ("a", "b"): 75.0, ("a", "b", "c"): 74.0}
    out = sens.choose_float(["a", "b", "c"], 90.0, 0.5, fake_accuracy(table, []))
    assert not out["met"]
    assert out["kept_float"] == ["a"]  # the best accuracy, with the fewest float layers among equals
    assert len(out["steps"]) == 4


def test_greedy_stops_at_the_float_layer_cap():
    table = {(): 70.0, ("a",): 75.0, ("a", "b"): 80.0, ("a", "b", "c"): 90.0}
    calls = []
    out = sens.choose_float(["a", "b", "c"], 90.0, 0.5, fake_accuracy(table, calls), max_layers=2)
    assert not out["met"] and out["kept_float"] == ["a", "b"] and ("a", "b", "c") not in calls


def test_rank_breaks_accuracy_ties_by_logit_error():
    table = {"a": {"gain": 0.0, "logit_mse": 0.5}, "b": {"gain": 0.2, "logit_mse": 0.9},
             "c": {"gain": 0.0, "logit_mse": 0.1}}
    assert sens.rank(table) == ["b", "c", "a"]


def test_sweep_subset_is_where_int8_departs_from_fp32():
    fp32 = np.array([[3.0, 0.0], [0.0, 3.0], [3.0, 0.0], [0.0, 3.0], [3.0, 0.0]], np.float32)
    int8 = fp32.copy()
    int8[1] = [0.0, 2.0]     # same top-1, large logit error
    int8[3] = [1.6, 1.5]     # top-1 changed, smaller error
    int8[4] = [2.9, 0.0]     # tiny error
    images = torch.arange(5, dtype=torch.float32).view(5, 1, 1, 1)
    labels = torch.tensor([0, 1, 0, 1, 1])
    scorer = sens.Scorer(lambda: [(images[:3], labels[:3]), (images[3:], labels[3:])], fp32, labels.numpy())
    idx = sens.hardest(scorer, int8, 2)
    assert list(idx) == [1, 3]  # the changed image, then the largest error
    sub = scorer.subset(idx)
    assert sub.n == 2 and list(sub.labels) == [1, 1] and np.array_equal(sub.fp32_logits, fp32[[1, 3]])
    assert [float(v) for x, _ in sub.batches() for v in x.flatten()] == [1.0, 3.0]  # the images match too


# ----------------------------------------------------------------------------- the stage, end to end

MODEL_FILE = '''
import torch.nn.functional as F
from torch import nn


class Small(nn.Module):
    """conv-ReLU-conv-ReLU-pool-linear, no BatchNorm (so a constant channel stays constant)."""

    def __init__(self, in_channels=1, num_classes=4):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 9, 3, padding=1)
        self.conv2 = nn.Conv2d(9, 16, 3, stride=2, padding=1)
        self.head = nn.Linear(16, num_classes)

    def forward(self, x):
        x = F.relu(self.conv2(F.relu(self.conv1(x))))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))
'''


def _set_outlier(model) -> None:
    """conv1's last channel: a constant 1000 after ReLU, which conv2 ignores (the float model does not see it)."""
    with torch.no_grad():
        model.conv1.weight[8] = 0
        model.conv1.bias[8] = 1000
        model.conv2.weight[:, 8] = 0


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    """A synthetic DataModule and two trained parents (plain, and with an outlier channel) as artifacts."""
    from compress.config import DataConfig
    from compress.context import Artifact
    from compress.data import build_data
    from compress.io import save_model
    from compress.registry import create_model

    tmp = tmp_path_factory.mktemp("stage")
    (tmp / "small.py").write_text(MODEL_FILE)
    data = build_data(DataConfig(dataset="synthetic", val_size=64, batch_size=32, eval_batch_size=64,
                                 synthetic={"num_train": 320, "num_test": 64, "num_classes": 4, "image_size": 16,
                                            "channels": 1}), "cpu", 0)
    parents = {}
    with one_thread():
        for kind in ("plain", "outlier"):
            torch.manual_seed(0)
            model = create_model("small.py:Small", num_classes=4, in_channels=1, base_dir=tmp)
            opt = torch.optim.Adam(model.parameters(), lr=1e-2)
            for epoch in range(8):
                for x, y in data.train_batches(epoch, augment=False):
                    if kind == "outlier":
                        _set_outlier(model)
                    loss = F.cross_entropy(model(x), y)
                    opt.zero_grad()
                    loss.backward()
                    opt.step()
            if kind == "outlier":
                _set_outlier(model)
            model.eval()
            d = tmp / kind
            d.mkdir()
            save_model(model, d / "model.pt", name="small.py:Small", num_classes=4, in_channels=1)
            files = {"model": str(d / "model.pt")}
            if kind == "plain":  # as the pipeline leaves it; the outlier parent makes the stage export itself
                files["onnx"] = str(export_onnx(model, d / "model.onnx", (1, 16, 16)))
            parents[kind] = Artifact(name=kind, stage="train", parent=None, model="small.py:Small", files=files,
                                     params=1, macs=1)
    return {"tmp": tmp, "data": data, "parents": parents}


def run_stage(env, name: str, parent: str = "plain", **fields):
    from compress.config import QuantizeStage
    from compress.context import Context
    from compress.stages import quantize

    cfg = QuantizeStage.model_validate({"type": "quantize", "from": parent, **fields})
    stage_dir = env["tmp"] / name
    stage_dir.mkdir()
    art = env["parents"][parent]
    messages = []
    ctx = Context(run_dir=env["tmp"], stage_dir=stage_dir, stage_name=name, device=torch.device("cpu"), seed=0,
                  data=env["data"], inputs=[art], teachers=[art], artifacts={}, base_dir=env["tmp"],
                  log=messages.append, progress=False)
    with one_thread():
        return quantize.run(cfg, ctx), messages


@pytest.mark.parametrize("name,fields", [
    ("nncf-ptq", {"calibration_size": 64}),
    ("nncf-qat", {"method": "qat", "calibration_size": 64, "epochs": 1, "batch_size": 64}),
    ("ort-ptq", {"backend": "onnxruntime", "calibration_size": 64, "calibrate_method": "percentile"}),
])
def test_stage_writes_a_scored_tensorrt_int8_artifact(stage_env, name, fields):
    from compress.runtime import evaluate, make_runner
    from compress.scoring import plans

    art, messages = run_stage(stage_env, name, **fields)
    data = stage_env["data"]
    assert art.precision == "int8" and set(art.files) - {"onnx_int8_cpu"} == {"onnx_int8", "layers", "layers_json"}
    qdq_nodes_are_tensorrt_int8(art.files["onnx_int8"])
    m = art.metrics
    # The CPU form beside it: kept only within 0.3 point of the FP32 parent on val (a QAT parent is PTQ'd here).
    cpu = m["cpu_int8"]
    assert cpu["shipped"] == ("onnx_int8_cpu" in art.files) and cpu["max_drop"] == pytest.approx(max(0.3, 100 / data.num_val), abs=1e-3)
    assert (cpu["accuracy_drop"] <= 0.3) == cpu["shipped"]
    assert m["backend"] == fields.get("backend", "nncf") and m["calibration_images"] == 64
    assert m["quantized_layers"] == 3 and m["kept_float_layers"] == [] and m["sensitivity_sweep"] is False
    assert m["weight_dequantize_linear"] == 3
    assert m["val_accuracy_fp32"] >= 80 and m["val_accuracy"] >= m["val_accuracy_fp32"] - 10
    assert ("qat" in m) == (fields.get("method") == "qat")
    if "qat" in m:
        assert m["qat"]["epochs"] == 1 and m["qat"]["best_accuracy"] > 0
    # Scored on the test split the way the benchmark scores every artifact.
    runner = make_runner("onnxruntime", art.files, "int8", threads=1)
    test = evaluate(runner, data.eval_batches("test"))
    assert test["n"] == data.num_test and test["accuracy"] >= 70
    assert [p[1] for p in plans(art, ["torch", "onnxruntime"], {})] == ["int8", "int8"]  # extra file keys are fine
    report = json.loads(open(art.files["layers_json"]).read())
    assert [r["name"] for r in report["layers"]] == ["/conv1/Conv", "/conv2/Conv", "/head/Gemm"]
    assert report["sweep_ran"] is False and "No sensitivity sweep ran" in open(art.files["layers"]).read()
    assert any("INT8 QDQ ONNX" in msg for msg in messages)


@pytest.mark.parametrize("backend", ["nncf", "onnxruntime"])
def test_stage_accuracy_aware_floats_the_outlier_layer(stage_env, backend):
    art, messages = run_stage(stage_env, f"aware-{backend}", parent="outlier", backend=backend, calibration_size=64,
                              max_accuracy_drop=2.0)
    m = art.metrics
    assert m["val_accuracy_int8_all_layers"] < m["val_accuracy_fp32"] - 20
    assert m["kept_float_layers"][0] == "/conv2/Conv"  # the layer that reads the outlier channel
    assert m["accuracy_target_met"] is True and m["val_accuracy_drop"] <= 2.0
    assert m["weight_dequantize_linear"] == 3 - len(m["kept_float_layers"])
    qdq_nodes_are_tensorrt_int8(art.files["onnx_int8"])
    report = json.loads(open(art.files["layers_json"]).read())
    assert report["sweep_ran"] and report["kept_float"] == m["kept_float_layers"]
    assert all(r["sensitivity"] is not None for r in report["layers"])
    assert "**yes**" in open(art.files["layers"]).read()


def test_stage_sweeps_on_request_without_floating(stage_env):
    art, messages = run_stage(stage_env, "sweep-only", backend="onnxruntime", calibration_size=32,
                              sensitivity_sweep=True, sensitivity_images=32)
    report = json.loads(open(art.files["layers_json"]).read())
    assert report["sweep_ran"] and report["sweep_images"] == 32 and report["kept_float"] == []
    assert all(r["sensitivity"] is not None for r in report["layers"])
    assert any("sensitivity sweep" in msg for msg in messages)


# ----------------------------------------------------------------------------- calibration images


def _rows(x: torch.Tensor) -> set[bytes]:
    return {row.tobytes() for row in x.reshape(len(x), -1).cpu().numpy()}


def test_calibration_subset_never_touches_test(stage_env):
    data = stage_env["data"]
    test_images = _rows(data.images("test", data.num_test)[0])
    val_images = _rows(data.images("val", data.num_val)[0])
    train_images = _rows(data.images("train", data.num_train)[0])
    for split, pool in (("train", train_images), ("val", val_images)):
        for seed in (1, 7):
            calib = _rows(data.calibration_subset(split, 48, seed))
            assert len(calib) == 48 and calib <= pool and not calib & test_images
    assert _rows(data.calibration_subset("val", 48, 1)) != _rows(data.calibration_subset("val", 48, 2))
    assert torch.equal(data.calibration_subset("val", 48, 3), data.calibration_subset("val", 48, 3))
    assert torch.equal(data.calibration_subset("train", 48), data.calibration_images(48))  # the old default
    with pytest.raises(ValueError, match="not 'test'"):
        data.calibration_subset("test", 8)


def test_stage_calibrates_on_the_split_and_seed_it_is_given(stage_env, monkeypatch):
    from compress.stages import quantize

    seen = {}
    real = quantize.ort_qdq

    def spy(fp32, calib, **kwargs):
        seen["calib"] = calib
        return real(fp32, calib, **kwargs)

    monkeypatch.setattr(quantize, "ort_qdq", spy)
    art, _ = run_stage(stage_env, "calib-val", backend="onnxruntime", calibration_split="val", calibration_size=40,
                       calibration_seed=5)
    data = stage_env["data"]
    assert torch.equal(seen["calib"], data.calibration_subset("val", 40, 5).cpu())
    assert art.metrics["calibration_split"] == "val" and art.metrics["calibration_seed"] == 5


def test_stage_needs_a_val_split_for_val_calibration_and_accuracy_targets(stage_env):
    from compress.config import DataConfig, QuantizeStage
    from compress.context import Context, StageError
    from compress.data import build_data
    from compress.stages import quantize

    data = build_data(DataConfig(dataset="synthetic", val_size=0, synthetic={"num_train": 64, "num_test": 16,
                                                                              "image_size": 16}), "cpu", 0)
    art = stage_env["parents"]["plain"]
    for fields, match in (({"calibration_split": "val"}, "calibration_split: val"),
                          ({"max_accuracy_drop": 1.0}, "max_accuracy_drop")):
        cfg = QuantizeStage.model_validate({"type": "quantize", "from": "plain", **fields})
        ctx = Context(run_dir=stage_env["tmp"], stage_dir=stage_env["tmp"], stage_name="q", device=torch.device("cpu"),
                      seed=0, data=data, inputs=[art], teachers=[], artifacts={}, base_dir=stage_env["tmp"],
                      log=lambda m: None, progress=False)
        with pytest.raises(StageError, match=match):
            quantize.run(cfg, ctx)


@pytest.mark.parametrize("stage,message", [
    ("{type: quantize, from: t, calibration_split: test}", "the test split only scores models"),
    ("{type: quantize, from: t, method: qat, backend: onnxruntime}", "use backend: nncf"),
    ("{type: quantize, from: t, calibrate_method: entropy}", "calibrate_method: entropy is an onnxruntime option"),
    ("{type: quantize, from: t, max_accuracy_drop: -1}", "greater than or equal to 0"),
    ("{type: quantize, from: t, backend: tensorrt}", "'nncf' or 'onnxruntime'"),
])
def test_config_rejects(tmp_path, stage, message):
    from compress.config import ConfigError, load

    path = tmp_path / "p.yaml"
    path.write_text(f"name: q\nstages:\n  t: {{type: train, model: resnet8}}\n  q: {stage}\n")
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        load(path)
    assert str(info.value).startswith(f"{path}:4: stages.q")


def test_config_accepts_the_new_fields(tmp_path):
    from compress.config import load

    path = tmp_path / "p.yaml"
    path.write_text("name: q\nstages:\n  t: {type: train, model: resnet8}\n"
                    "  q: {type: quantize, from: t, backend: onnxruntime, calibrate_method: entropy, "
                    "calibration_split: val, calibration_seed: 3, max_accuracy_drop: 0.5, sensitivity_images: 500}\n")
    q = load(path).stages["q"]
    assert (q.backend, q.calibrate_method, q.calibration_split, q.calibration_seed, q.max_accuracy_drop,
            q.sensitivity_images, q.sensitivity_sweep) == ("onnxruntime", "entropy", "val", 3, 0.5, 500, False)
