"""CPU runtimes side by side: OpenVINO against ONNX Runtime and PyTorch, runtime isolation, CPU INT8 forms."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from compress.context import Artifact
from compress.onnx_export import export_onnx
from compress.registry import create_model
from compress.runtime import make_runner

ROOT = Path(__file__).parents[1]
ov = pytest.importorskip("openvino")


def _shufflenet() -> nn.Module:
    import students.shufflenetv2  # noqa: F401  (registers the model)

    torch.manual_seed(0)
    model = create_model("shufflenetv2_x0_5", num_classes=10, in_channels=1).eval()
    for m in model.modules():  # BatchNorm statistics away from identity: the channel order matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def tiny_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 4)).eval()


def test_openvino_runner_matches_torch_in_fp32(tmp_path):
    model = tiny_net()
    export_onnx(model, tmp_path / "model.onnx", (1, 16, 16))
    runner = make_runner("openvino", {"onnx": str(tmp_path / "model.onnx")}, "fp32", threads=1)
    assert (runner.runtime, runner.precision, runner.device) == ("openvino", "fp32", "cpu (1 thread)")
    assert runner.inference_precision == "f32"  # asked for and reported by the compiled model
    x = torch.randn(5, 1, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(runner(x), model(x), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(runner(x[:1]), model(x[:1]), atol=1e-4, rtol=1e-4)  # another batch size
    with pytest.raises(ValueError, match="fp32 or int8"):
        make_runner("openvino", {"onnx": str(tmp_path / "model.onnx")}, "fp16")


def test_exported_shufflenet_reads_the_same_in_openvino(tmp_path):
    """OpenVINO folds a channel Gather into the next 1x1 Conv wrongly; the export writes shuffles it reads alike."""
    model = _shufflenet()
    export_onnx(model, tmp_path / "model.onnx", (1, 28, 28))
    graph = onnx.load(str(tmp_path / "model.onnx")).graph
    channel_gathers = [n for n in graph.node if n.op_type == "Gather"
                       and any(a.name == "axis" and a.i == 1 for a in n.attribute)]
    assert not channel_gathers and sum(n.op_type == "Transpose" for n in graph.node) == 16  # one per unit
    x = torch.randn(8, 1, 28, 28)
    with torch.no_grad():
        ref = model(x)
    files = {"onnx": str(tmp_path / "model.onnx")}
    for runtime in ("onnxruntime", "openvino"):
        torch.testing.assert_close(make_runner(runtime, files, "fp32", threads=1)(x), ref, atol=1e-4, rtol=1e-4)


class _Data:
    """The two calls the benchmark stage makes of a data module, on fixed random images."""

    def __init__(self, n: int = 96):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 1, 28, 28, generator=g)
        self.y = torch.randint(0, 10, (n,), generator=g)

    def eval_batches(self, split):
        return [(self.x[i:i + 32], self.y[i:i + 32]) for i in range(0, len(self.x), 32)]

    def images(self, split, n):
        return self.x[:n], self.y[:n]


def _bench(tmp_path, runtimes, artifacts):
    from types import SimpleNamespace

    from compress.config import BenchmarkConfig
    from compress.stages import benchmark

    ctx = SimpleNamespace(data=_Data(), artifacts=artifacts, run_dir=tmp_path, device=torch.device("cpu"),
                          base_dir=ROOT, log=lambda m: None, engines={})
    cfg = BenchmarkConfig(runtimes=runtimes, batch_sizes=[2], warmup=1, iters=2, threads=1)
    return benchmark.run(cfg, ctx)


def test_runtime_order_changes_no_accuracy_and_rows_are_checked_against_onnxruntime(tmp_path):
    export_onnx(tiny_net(), tmp_path / "tiny.onnx", (1, 28, 28))
    arts = {"tiny": Artifact(name="tiny", stage="train", parent=None, model="tiny",
                             files={"onnx": str(tmp_path / "tiny.onnx")}, params=1, macs=1)}
    a = _bench(tmp_path, ["openvino", "onnxruntime"], arts)
    b = _bench(tmp_path, ["onnxruntime", "openvino"], arts)
    acc = lambda rows: {(r["runtime"], r["precision"]): r["accuracy"] for r in rows}  # noqa: E731
    assert acc(a) == acc(b) and len(acc(a)) == 2
    ovrow = next(r for r in a if r["runtime"] == "openvino")
    assert ovrow["status"] == "ok" and ovrow["inference_precision"] == "f32"
    assert ovrow["parity"]["reference"] == "onnxruntime" and ovrow["parity"]["top1_agreement"] == 1.0
    assert ovrow["file"] == str(tmp_path / "tiny.onnx")
    assert not list(tmp_path.glob(".benchmark-*"))  # the workers' files are gone


def test_a_runtime_that_disagrees_with_onnxruntime_fails_its_row(tmp_path):
    """Rows whose parity-image decisions differ from ONNX Runtime's are failed, with their numbers kept."""
    from compress.scoring import blank_row, compare_outputs

    export_onnx(_shufflenet(), tmp_path / "shuf.onnx", (1, 28, 28))
    torch.manual_seed(1)
    export_onnx(create_model("shufflenetv2_x0_5", num_classes=10, in_channels=1).eval(), tmp_path / "other.onnx",
                (1, 28, 28))
    x = _Data().x
    art = Artifact(name="m", stage="train", parent=None, model="x")
    rows = []
    for runtime, name in (("onnxruntime", "shuf"), ("openvino", "shuf"), ("openvino", "other")):
        row = blank_row(art, runtime, "fp32", None)
        row["accuracy"] = 50.0
        np.save(tmp_path / f"{runtime}-{name}.npy",
                make_runner(runtime, {"onnx": str(tmp_path / f"{name}.onnx")}, "fp32", threads=1)(x).numpy())
        row["_parity"] = row["_parity_kept"] = str(tmp_path / f"{runtime}-{name}.npy")
        rows.append(row)
    compare_outputs(rows, log=lambda m: None)
    same, other = rows[1], rows[2]
    assert same["status"] == "ok" and same["parity"]["top1_agreement"] == 1.0
    assert other["status"] == "failed" and "disagree with onnxruntime" in other["reason"]
    assert other["accuracy"] == 50.0 and other["parity"]["top1_agreement"] < 0.95
    assert all("_parity" not in r and "_parity_kept" not in r for r in rows)


def test_missing_openvino_is_one_line_and_exit_2(tmp_path):
    yaml = tmp_path / "p.yaml"
    yaml.write_text("name: p\ndata: {dataset: synthetic, synthetic: {num_train: 64, num_test: 16, num_classes: 2, "
                    "image_size: 8, channels: 1}, val_size: 16}\nstages:\n  t: {type: train, model: resnet8, epochs: 1}\n"
                    "benchmark: {runtimes: [onnxruntime, openvino]}\n")
    hide = ("import importlib.util as u, sys; f = u.find_spec; "
            "u.find_spec = lambda n, *a: None if n == 'openvino' else f(n, *a); "
            "sys.argv = ['compress'] + sys.argv[1:]; from compress.cli import app; app()")
    proc = subprocess.run([sys.executable, "-c", hide, "run", str(yaml), "--out", str(tmp_path / "runs"),
                           "--reports", str(tmp_path / "reports")], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "openvino" in lines[0] and "pip install" in lines[0]
    assert not (tmp_path / "runs" / "p" / "t").exists()  # no stage ran


def _trained_tiny(n: int = 512):
    """A tiny net that learned which quadrant of the image is bright (seconds on one core)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 16, 16, generator=g) * 0.3
    y = torch.randint(0, 4, (n,), generator=g)
    for i, q in enumerate(y.tolist()):
        r, c = divmod(q, 2)
        x[i, 0, r * 8:(r + 1) * 8, c * 8:(c + 1) * 8] += 1.0
    model = tiny_net().train()
    opt = torch.optim.Adam(model.parameters(), lr=0.02)
    for _ in range(60):
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval(), x, y


def test_each_cpu_int8_form_is_within_its_float_parent(tmp_path):
    from compress.quant.cpu_int8 import cpu_qdq
    from compress.quant.ort_ptq import quantize_ort

    model, x, y = _trained_tiny()
    export_onnx(model, tmp_path / "model.onnx", (1, 16, 16))
    quantize_ort(tmp_path / "model.onnx", x[:128], tmp_path / "trt.onnx", subset_size=128)
    info = cpu_qdq(tmp_path / "model.onnx", x[:128], tmp_path / "cpu.onnx", subset_size=128)
    assert info["onnx_int8_cpu"] == str(tmp_path / "cpu.onnx")
    graph = onnx.load(str(tmp_path / "cpu.onnx")).graph
    qtypes = {onnx.helper.tensor_dtype_to_np_dtype(i.data_type) for i in graph.initializer
              if i.name.endswith("_zero_point")}
    assert np.dtype(np.uint8) in qtypes  # uint8 activations, the form ONNX Runtime's CPU kernels fuse
    assert any(i.data_type == onnx.TensorProto.INT32 for i in graph.initializer)  # int32 biases
    test = x[128:]
    with torch.no_grad():
        fp32 = (model(test).argmax(1) == y[128:]).float().mean().item()
    files = {"onnx": str(tmp_path / "model.onnx"), "onnx_int8": str(tmp_path / "trt.onnx"),
             "onnx_int8_cpu": str(tmp_path / "cpu.onnx")}
    assert fp32 > 0.9
    for runtime, key in (("onnxruntime", "onnx_int8"), ("onnxruntime", "onnx_int8_cpu"),
                         ("openvino", "onnx_int8_cpu")):
        runner = make_runner(runtime, {"onnx": files["onnx"], key: files[key]}, "int8", threads=1)
        acc = (runner(test).argmax(1) == y[128:]).float().mean().item()
        assert abs(acc - fp32) <= 0.01, (runtime, key, acc, fp32)  # 384 images: at most 3 flips
    # ONNX Runtime's fused integer kernels compute what the file's QDQ arithmetic says (7-bit weights:
    # no int16 saturation in AVX2's u8s8 kernels), as its unoptimized reference run does.
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    plain = ort.InferenceSession(files["onnx_int8_cpu"], opts, providers=["CPUExecutionProvider"])
    reference = plain.run(None, {"input": test.numpy()})[0]
    fused = make_runner("onnxruntime", files, "int8", threads=1)(test).numpy()
    assert np.abs(fused - reference).max() <= 1e-3 * np.abs(reference).max()
    for runtime in ("onnxruntime", "openvino"):  # each runtime's first choice is the CPU form
        assert make_runner(runtime, files, "int8", threads=1).file == files["onnx_int8_cpu"]
    assert json.dumps(info)  # manifest-ready
