"""A smoke pipeline end to end on tiny synthetic data: every stage, export, benchmark, report, cache."""

import json
import subprocess
import sys
from pathlib import Path

import onnx
import pytest

ROOT = Path(__file__).parents[1]
ROW_KEYS = {"name", "stage", "parent", "model", "runtime", "precision", "params", "macs", "size_bytes", "accuracy",
            "latency_ms", "throughput_ips", "status", "reason"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("smoke")
    cmd = [sys.executable, "-m", "compress", "run", "pipelines/smoke.yaml", "--out", str(tmp / "runs"),
           "--reports", str(tmp / "reports")]
    first = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    second = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert second.returncode == 0, second.stderr[-3000:]
    return tmp, first, second


@pytest.mark.slow
def test_report_has_every_artifact_on_every_runtime(smoke):
    tmp, _, _ = smoke
    report = json.loads((tmp / "reports/smoke/report.json").read_text())
    assert report["schema"] == "compress.report/1"
    assert {"pipeline", "created", "machine", "artifacts"} <= set(report)
    assert report["machine"]["cpu"] and "torch" in report["machine"]["versions"]
    rows = report["artifacts"]
    assert all(ROW_KEYS <= set(r) for r in rows)
    names = {r["name"] for r in rows}
    assert names == {"teacher", "student", "shuffle", "student-pruned", "student-int8", "shuffle-int8"}
    ok = [r for r in rows if r["status"] == "ok"]
    # Every float model on torch and onnxruntime, the INT8 one on onnxruntime.
    assert {(r["name"], r["runtime"]) for r in ok} >= {(n, rt) for n in names - {"student-int8", "shuffle-int8"}
                                                        for rt in ("torch", "onnxruntime")}
    assert {("student-int8", "onnxruntime"), ("shuffle-int8", "onnxruntime")} <= {(r["name"], r["runtime"]) for r in ok}
    for r in ok:
        assert 0 <= r["accuracy"] <= 100 and r["size_bytes"] > 0 and r["params"] > 0 and r["macs"] > 0
        for b in ("1", "8"):
            lat = r["latency_ms"][b]
            assert 0 < lat["p50"] <= lat["p90"] <= lat["p99"]
            assert r["throughput_ips"][b] > 0
    # The teacher learned the synthetic task, and the student learned from it.
    acc = {(r["name"], r["runtime"]): r["accuracy"] for r in ok}
    assert acc[("teacher", "torch")] > 50 and acc[("student", "torch")] > 40
    # Same weights, two runtimes: the same accuracy (within one image or two).
    assert abs(acc[("teacher", "torch")] - acc[("teacher", "onnxruntime")]) <= 2
    # No TensorRT here: skipped rows that say why.
    import torch

    if not torch.cuda.is_available():
        trt = [r for r in rows if r["runtime"] == "tensorrt"]
        assert trt and all(r["status"] == "skipped" and r["reason"] for r in trt)
    assert (tmp / "reports/smoke/report.md").read_text().count("| teacher |") >= 2
    assert (tmp / "reports/smoke/pareto.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.slow
def test_run_directory_holds_models_onnx_and_manifests(smoke):
    tmp, _, _ = smoke
    run = tmp / "runs/smoke"
    for stage in ("teacher", "student", "student-pruned"):
        manifest = json.loads((run / stage / "manifest.json").read_text())
        assert manifest["status"] == "done" and manifest["wall_seconds"] > 0
        assert set(manifest["outputs"]) >= {"model", "onnx"}
        parity = manifest["artifact"]["metrics"]["onnx_parity"]
        assert parity["max_abs_diff"] < 1e-3 and parity["top1_agreement"] >= 0.99
        model = onnx.load(run / stage / "model.onnx")
        assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # dynamic batch
    pruned = json.loads((run / "student-pruned/manifest.json").read_text())["artifact"]
    student = json.loads((run / "student/manifest.json").read_text())["artifact"]
    assert pruned["macs"] < 0.7 * student["macs"]
    assert json.loads((run / "student-pruned/manifest.json").read_text())["teachers"] == ["teacher"]
    int8 = json.loads((run / "student-int8/manifest.json").read_text())
    assert int8["artifact"]["precision"] == "int8" and int8["artifact"]["files"]["onnx_int8"].endswith(".onnx")
    # QAT: fine-tuned against the teacher on the int8 grid; PTQ: calibration only.
    assert int8["teachers"] == ["teacher"] and int8["artifact"]["metrics"]["qat"]["epochs"] == 1
    ptq = json.loads((run / "shuffle-int8/manifest.json").read_text())
    assert ptq["teachers"] == [] and "qat" not in ptq["artifact"]["metrics"]
    assert not list(run.rglob("*.tmp"))


@pytest.mark.slow
def test_second_run_reuses_every_stage(smoke):
    _, first, second = smoke
    assert "skipped" not in first.stderr.split("[engine]")[0]
    for stage in ("teacher", "student", "shuffle", "student-pruned", "student-int8", "shuffle-int8"):
        assert f"[{stage}] unchanged since the last run" in second.stderr


@pytest.mark.slow
def test_report_links_per_layer_tables_of_pruned_and_quantized_models(smoke):
    tmp, _, _ = smoke
    out = tmp / "reports/smoke"
    report = json.loads((out / "report.json").read_text())
    assert set(report["layer_tables"]) == {"student-pruned", "student-int8", "shuffle-int8"}
    for name, rel in report["layer_tables"].items():
        copied = (out / rel).read_text()
        assert copied == (tmp / "runs/smoke" / name / "layers.md").read_text() and copied.count("|") > 10
    md, page = (out / "report.md").read_text(), (out / "report.html").read_text()
    assert "- [student-pruned](layers/student-pruned.md)" in md
    assert page.count("<details><summary>") == 3 and "<summary>student-int8</summary>" in page
