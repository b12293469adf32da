"""NNCF post-training INT8 -> QDQ ONNX that TensorRT accepts (signed int8, zero points 0,
per-channel weights) and that still agrees with the FP32 model."""

from __future__ import annotations

import contextlib
import copy
import math

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import numpy_helper
from torch import nn

from compress.stages.export import check_parity, export_onnx, onnx_session
from compress.stages.quantize import fold_batchnorm, qdq_zero_points, quantize_ptq

INPUT_SHAPE = (3, 24, 24)
NUM_CLASSES = 4


class TinyNet(nn.Module):
    """conv-BN-ReLU stem, a depthwise-separable residual block, global pool, linear head."""

    def __init__(self, num_classes: int = NUM_CLASSES):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.block = nn.Sequential(
            nn.Conv2d(16, 16, 3, padding=1, groups=16, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
            nn.Conv2d(16, 16, 1, bias=False), nn.BatchNorm2d(16),
        )
        self.expand = nn.Sequential(nn.Conv2d(16, 32, 1, bias=False), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, num_classes)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.block(x))
        x = self.expand(x)
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


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
