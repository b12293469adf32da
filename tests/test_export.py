"""FP32 ONNX export: dynamic batch, parity with PyTorch, atomic writes."""

from __future__ import annotations

import onnx
import pytest
import torch
from torch import nn

from compress.onnx_export import check_parity, export_onnx, onnx_session
from tests.conftest import TinyNet

INPUT_SHAPE = (3, 24, 24)
NUM_CLASSES = 5


class Broken(TinyNet):
    def forward(self, x):
        raise RuntimeError("boom")


def make_model() -> TinyNet:
    torch.manual_seed(0)
    model = TinyNet(NUM_CLASSES, expand=None)
    # Non-trivial BatchNorm statistics, so BN folding is actually exercised by the parity check.
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.eval()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    model = make_model()
    path = export_onnx(model, tmp_path_factory.mktemp("export") / "model.onnx", INPUT_SHAPE)
    return model, path


def test_export_is_valid_onnx_with_named_dynamic_batch(exported):
    _, path = exported
    proto = onnx.load(str(path))
    onnx.checker.check_model(proto)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value
    assert proto.opset_import[0].version == 17
    ops = {n.op_type for n in proto.graph.node}
    assert "BatchNormalization" not in ops  # folded into the convolutions


@pytest.mark.parametrize("batch", [1, 7])
def test_dynamic_batch_runs_in_onnxruntime(exported, batch):
    _, path = exported
    session = onnx_session(path, threads=1)
    out = session.run(None, {"input": torch.randn(batch, *INPUT_SHAPE).numpy()})[0]
    assert out.shape == (batch, NUM_CLASSES)


def test_parity_with_pytorch(exported):
    model, path = exported
    images = torch.randn(48, *INPUT_SHAPE, generator=torch.Generator().manual_seed(1))
    parity = check_parity(model, path, images)
    assert parity["n"] == 48
    assert parity["max_abs_diff"] < 1e-4
    assert parity["top1_agreement"] == 1.0


def test_export_keeps_training_mode(tmp_path):
    model = make_model().train()
    export_onnx(model, tmp_path / "m.onnx", INPUT_SHAPE)
    assert model.training


def test_failed_export_leaves_no_file(tmp_path):
    target = tmp_path / "broken.onnx"
    with pytest.raises(RuntimeError, match="boom"):
        export_onnx(Broken(), target, INPUT_SHAPE)
    assert list(tmp_path.iterdir()) == []  # neither the target nor a temp file


def test_failed_export_keeps_previous_file(tmp_path):
    target = export_onnx(make_model(), tmp_path / "model.onnx", INPUT_SHAPE)
    before = target.read_bytes()
    with pytest.raises(RuntimeError):
        export_onnx(Broken(), target, INPUT_SHAPE)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]
