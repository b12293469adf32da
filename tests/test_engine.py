"""TensorRT engine stage: the FP16 ONNX rewrite (runs anywhere) and engines (GPU + TensorRT only)."""

from __future__ import annotations

import json
import sys
import types
import warnings
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from compress import install_hint
from compress import trt as engine
from compress.trt import EngineError, build_engine, fp16_onnx, tensorrt_status

ort = pytest.importorskip("onnxruntime")


def _has_trt_gpu() -> bool:
    return tensorrt_status()[0]


needs_trt_gpu = pytest.mark.skipif(not _has_trt_gpu(), reason="needs tensorrt and a CUDA GPU")


class TinyNet(nn.Module):
    """Covers the ops fp16_onnx must handle: an unfolded BatchNorm (it follows a ReLU), a scalar
    Constant, a residual Add, a Resize (whose scales must stay float32), a reduction and a Gemm."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, num_classes)

    def forward(self, x):
        y = self.bn(torch.relu(self.c1(x)))
        y = y + 0.5 * self.c2(y)
        y = nn.functional.interpolate(y, scale_factor=2.0, mode="nearest")
        return self.fc(y.mean((2, 3)))


def export(model: nn.Module, path: Path, size: int = 16) -> Path:
    with warnings.catch_warnings():  # the TorchScript exporter is deprecated but fast and still works
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (torch.randn(2, 3, size, size),), str(path), input_names=["input"],
                          output_names=["logits"], dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
                          opset_version=17, dynamo=False)
    return path


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    torch.manual_seed(0)
    model = TinyNet().eval()
    with torch.no_grad():  # non-trivial statistics so the BatchNorm does real work
        model.bn.running_mean.uniform_(-1, 1)
        model.bn.running_var.uniform_(0.5, 2.0)
    path = export(model, tmp_path_factory.mktemp("onnx") / "tiny.onnx")
    return model, path


def _run(path: Path, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------- fp16_onnx

def test_fp16_onnx_matches_fp32(tiny, tmp_path):
    model, src = tiny
    assert "BatchNormalization" in {n.op_type for n in onnx.load(str(src)).graph.node}
    dst = fp16_onnx(src, tmp_path / "tiny_fp16.onnx")
    x = np.random.default_rng(0).standard_normal((5, 3, 16, 16)).astype(np.float32)
    ref, out = _run(src, x), _run(dst, x)
    assert out.dtype == np.float32 and out.shape == ref.shape
    rel = np.abs(out - ref).max() / np.abs(ref).max()
    assert rel < 1e-2
    assert rel > 0  # it really computed in fp16
    with torch.inference_mode():
        np.testing.assert_allclose(out, model(torch.from_numpy(x)).numpy(), atol=1e-2 * np.abs(ref).max())


def test_fp16_onnx_graph(tiny, tmp_path):
    _, src = tiny
    m = onnx.load(str(fp16_onnx(src, tmp_path / "tiny_fp16.onnx")))
    g = m.graph
    assert [i.type.tensor_type.elem_type for i in g.input] == [TensorProto.FLOAT]
    assert [o.type.tensor_type.elem_type for o in g.output] == [TensorProto.FLOAT]
    assert g.node[0].op_type == "Cast" and g.node[0].input[0] == "input"
    assert g.node[-1].op_type == "Cast" and g.node[-1].output[0] == "logits"
    resize = next(n for n in g.node if n.op_type == "Resize")
    float_inits = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT}
    half_inits = {i.name for i in g.initializer if i.data_type == TensorProto.FLOAT16}
    assert half_inits, "weights should be float16"
    assert float_inits <= set(resize.input), "only Resize's scales/roi may stay float32"
    assert engine._onnx_precision(tmp_path / "tiny_fp16.onnx") == "fp16"
    assert engine._onnx_precision(src) == "fp32"


def test_fp16_onnx_converts_constant_value_float(tmp_path):
    # Constant(value_float) always yields float32; left alone, the Mul below would mix types.
    w = numpy_helper.from_array(np.full((2,), 3.0, np.float32), "w")
    g = helper.make_graph(
        [helper.make_node("Constant", [], ["c"], value_float=2.0),
         helper.make_node("Mul", ["x", "c"], ["xc"]), helper.make_node("Add", ["xc", "w"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 2])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 2])], initializer=[w])
    src = tmp_path / "c.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    out = _run(fp16_onnx(src, tmp_path / "c16.onnx"), np.array([[1.0, -2.0]], np.float32))
    np.testing.assert_allclose(out, [[5.0, -1.0]])


def test_fp16_onnx_refuses_quantized(tmp_path):
    scale = numpy_helper.from_array(np.array(0.1, np.float32), "s")
    zp = numpy_helper.from_array(np.array(0, np.int8), "z")
    g = helper.make_graph(
        [helper.make_node("QuantizeLinear", ["x", "s", "z"], ["q"]),
         helper.make_node("DequantizeLinear", ["q", "s", "z"], ["y"])],
        "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], initializer=[scale, zp])
    src = tmp_path / "q.onnx"
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(src))
    assert engine._onnx_precision(src) == "int8"
    with pytest.raises(ValueError, match="already quantized"):
        fp16_onnx(src, tmp_path / "q16.onnx")
    assert not (tmp_path / "q16.onnx").exists()


# ----------------------------------------------------------------------------- availability

@pytest.mark.skipif(_has_trt_gpu(), reason="tensorrt and a GPU are present")
def test_status_says_what_is_missing():
    ok, reason = tensorrt_status()
    assert not ok
    try:
        import tensorrt  # noqa: F401
        have_trt = True
    except Exception:
        have_trt = False
    if not have_trt:
        # the hint installs this project's extra, never PyPI's unrelated `compress`
        assert "tensorrt is not installed" in reason and install_hint("tensorrt") in reason
        assert "'compress[" not in reason
    if not torch.cuda.is_available():
        assert "no CUDA GPU" in reason


def test_status_reasons_with_a_stand_in_tensorrt(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="10.3.0"))
    ok, reason = tensorrt_status()
    assert not ok and reason == "no CUDA GPU (torch.cuda.is_available() is False)"
    monkeypatch.setitem(sys.modules, "tensorrt", types.SimpleNamespace(__version__="8.6.1"))
    assert "needs TensorRT 10" in tensorrt_status()[1]


def test_network_flags_per_version():
    flags = types.SimpleNamespace(STRONGLY_TYPED=3)
    trt10 = types.SimpleNamespace(__version__="10.13.0", NetworkDefinitionCreationFlag=flags)
    trt11 = types.SimpleNamespace(__version__="11.0.0", NetworkDefinitionCreationFlag=flags)
    assert engine._network_flags(trt10) == 1 << 3
    assert engine._network_flags(trt11) == 0  # strongly typed is the only mode


@pytest.mark.skipif(_has_trt_gpu(), reason="tensorrt and a GPU are present")
def test_build_and_cache_fail_clearly_without_tensorrt(tiny, tmp_path):
    _, src = tiny
    with pytest.raises(EngineError, match="cannot build tiny.engine: .*(tensorrt|CUDA)"):
        build_engine(src, tmp_path / "tiny.engine", min_batch=1, opt_batch=4, max_batch=8)
    assert not (tmp_path / "tiny.engine").exists()
    with pytest.raises(EngineError):
        engine.timing_cache_path(tmp_path)
    with pytest.raises(EngineError):
        engine.TrtRunner(tmp_path / "tiny.engine")


def test_bad_profile_is_refused_before_anything_else(tiny, tmp_path):
    with pytest.raises(EngineError, match="min <= opt <= max"):
        build_engine(tiny[1], tmp_path / "x.engine", min_batch=8, opt_batch=4, max_batch=16)


# ----------------------------------------------------------------------------- GPU + TensorRT

@needs_trt_gpu
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_builds_and_matches_torch(tiny, tmp_path, precision):
    model, src = tiny
    if precision == "fp16":
        src = fp16_onnx(src, tmp_path / "tiny_fp16.onnx")
    cache = engine.timing_cache_path(tmp_path / "cache")
    info = build_engine(src, tmp_path / "tiny.engine", min_batch=1, opt_batch=4, max_batch=8, timing_cache=cache)
    assert info["precision"] == precision and info["profile"]["max"][0] == 8
    assert cache.is_file() and (tmp_path / "tiny.engine.json").is_file()

    runner = engine.TrtRunner(tmp_path / "tiny.engine")
    assert runner.batch_range == (1, 8) and runner.precision == precision
    x = torch.randn(5, 3, 16, 16)
    out = runner(x.cuda())
    runner.sync()
    with torch.inference_mode():
        ref = model(x)
    tol = 1e-2 if precision == "fp16" else 1e-3
    torch.testing.assert_close(out.cpu(), ref, atol=tol * ref.abs().max().item(), rtol=0)
    with pytest.raises(EngineError, match=r"1\.\.8"):
        runner(torch.randn(9, 3, 16, 16).cuda())


@needs_trt_gpu
def test_runner_refuses_an_engine_from_another_gpu(tiny, tmp_path):
    build_engine(tiny[1], tmp_path / "tiny.engine", min_batch=1, opt_batch=1, max_batch=2)
    manifest = tmp_path / "tiny.engine.json"
    data = json.loads(manifest.read_text())
    data["gpu"] = "Some Other GPU"
    manifest.write_text(json.dumps(data))
    with pytest.raises(EngineError, match="Some Other GPU"):
        engine.TrtRunner(tmp_path / "tiny.engine")
