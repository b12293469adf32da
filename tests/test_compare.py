"""`compress compare`: matching reports, deltas, machine notes, gates and their exit codes, on hand-made reports."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress.cli import app
from compress.compare import CompareError, check_gates, compare, load_report, parse_gate

ROOT = Path(__file__).parents[1]


def row(name, runtime, precision, acc, p50s, status="ok"):
    lat = {str(b): {"p50": p, "p90": p * 1.1, "p99": p * 1.2, "mean": p} for b, p in p50s.items()}
    return {"name": name, "stage": "train", "parent": None, "model": "m", "runtime": runtime, "precision": precision,
            "device": "cpu", "params": 1000, "macs": 2000, "size_bytes": 4096,
            "accuracy": acc if status == "ok" else None,
            "latency_ms": lat if status == "ok" else {}, "throughput_ips": {}, "status": status,
            "reason": None if status == "ok" else "no GPU"}


def report(rows, gpu=None, cpu="AMD EPYC", name="p"):
    return {"schema": "compress.report/1", "pipeline": {"name": name}, "created": "2026-01-01T00:00:00+00:00",
            "machine": {"cpu": cpu, "gpu": gpu}, "artifacts": rows}


BASE = [row("teacher", "onnxruntime", "fp32", 92.0, {1: 1.0, 8: 4.0}),
        row("student", "onnxruntime", "fp32", 90.0, {1: 0.5, 8: 2.0}),
        row("student", "tensorrt", "fp16", None, {}, status="skipped"),
        row("gone", "onnxruntime", "fp32", 80.0, {1: 0.1, 8: 0.2})]
NEW = [row("teacher", "onnxruntime", "fp32", 92.0, {1: 1.05, 8: 4.0, 32: 9.0}),   # +5% at batch 1
       row("student", "onnxruntime", "fp32", 89.2, {1: 0.8, 8: 2.1}),             # -0.8 points, +0.3 ms / +60% @1
       row("student", "tensorrt", "fp16", None, {}, status="skipped"),
       row("new", "onnxruntime", "int8", 85.0, {1: 0.3, 8: 0.6})]


@pytest.fixture
def pair(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b.json"
    a.mkdir()
    (a / "report.json").write_text(json.dumps(report(BASE)))
    b.write_text(json.dumps(report(NEW, name="q")))
    return a, b


def test_matching_and_deltas(pair):
    cmp = compare([load_report(p) for p in pair])
    assert cmp.keys == [("teacher", "onnxruntime", "fp32"), ("student", "onnxruntime", "fp32"),
                        ("student", "tensorrt", "fp16")]
    assert cmp.batches == ["1", "8"]                      # 32 is only in the second report
    assert cmp.only == {"A": [("gone", "onnxruntime", "fp32")], "B": [("new", "onnxruntime", "int8")]}
    assert cmp.machine_note is None
    drops = {key: d for d, key, _ in cmp.accuracy_deltas()}
    assert drops == {("teacher", "onnxruntime", "fp32"): 0.0, ("student", "onnxruntime", "fp32"): pytest.approx(0.8)}
    worst = max(cmp.latency_deltas(), key=lambda d: d[1])
    assert worst[2] == ("student", "onnxruntime", "fp32") and worst[4] == "1" and worst[1] == pytest.approx(0.6)


@pytest.mark.parametrize("gate,violated", [
    # 90.0 - 89.2 is 0.7999999999999972 in floating point; >=0.8 must still catch it
    ("accuracy_drop>0.5", True), ("accuracy_drop>0.8", False), ("accuracy_drop>=0.8", True),
    ("accuracy_drop > 1", False), ("latency_increase>50%", True), ("latency_increase>60%", False),
    ("latency_increase>0.2", True), ("latency_increase>0.35", False), ("latency_increase>=0.1", True),
])
def test_gates(pair, gate, violated):
    cmp = compare([load_report(p) for p in pair])
    failures = check_gates(cmp, [parse_gate(gate)])
    assert bool(failures) == violated, failures
    if violated:
        assert failures[0].startswith(gate.strip()) and "student (onnxruntime, fp32)" in failures[0]


@pytest.mark.parametrize("text", ["accuracy_drop", "accuracy_drop<1", "speed>1", "latency_increase>x%",
                                  "accuracy_drop>0.5%", ""])
def test_malformed_gates_are_refused(text):
    with pytest.raises(CompareError, match="--fail-if"):
        parse_gate(text)


def test_nothing_in_common_fails_the_gate_instead_of_passing():
    a = report([row("x", "onnxruntime", "fp32", 90.0, {1: 1.0})])
    b = report([row("y", "onnxruntime", "fp32", 10.0, {1: 9.0})])
    failures = check_gates(compare([a, b]), [parse_gate("accuracy_drop>1"), parse_gate("latency_increase>1%")])
    assert len(failures) == 2 and all("no artifact" in f for f in failures)


def test_cli_table_gates_and_exit_codes(pair, tmp_path):
    a, b = pair
    runner = CliRunner()
    ok = runner.invoke(app, ["compare", str(a), str(b), "--fail-if", "accuracy_drop>1"])
    assert ok.exit_code == 0, ok.output
    assert "teacher" in ok.stdout and "89.20 (-0.80)" in ok.stdout and "0.800 (+60.0%)" in ok.stdout
    assert "only in A (not compared): gone (onnxruntime, fp32)" in ok.stdout
    assert "different machines" not in ok.stdout

    bad = runner.invoke(app, ["compare", str(a), str(b), "--fail-if", "accuracy_drop>0.5",
                              "--fail-if", "latency_increase>10%", "--fail-if", "latency_increase>100%"])
    assert bad.exit_code == 1
    gates = [ln for ln in bad.stderr.splitlines() if ln.startswith("gate:")]
    assert len(gates) == 2 and "accuracy_drop>0.5 violated" in gates[0] and "latency_increase>10% violated" in gates[1]


def test_cli_states_different_machines_and_plots(pair, tmp_path):
    a, _ = pair
    gpu = tmp_path / "gpu.json"
    gpu.write_text(json.dumps(report(NEW, gpu="NVIDIA H100 80GB HBM3")))
    png = tmp_path / "cmp.png"
    out = CliRunner().invoke(app, ["compare", str(a), str(gpu), "--plot", str(png)])
    assert out.exit_code == 0, out.output
    assert "different machines" in out.stdout and "NVIDIA H100 80GB HBM3" in out.stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_unreadable_inputs_are_one_line_exit_2(pair, tmp_path):
    a, b = pair
    (tmp_path / "binary.onnx").write_bytes(b"\x08\x8f\xff\x00")
    (tmp_path / "other.json").write_text('{"status": "done"}')
    (tmp_path / "broken.json").write_text('{"schema": ')
    cases = [[str(a), str(tmp_path / "missing")], [str(a), str(tmp_path / "binary.onnx")],
             [str(a), str(tmp_path / "other.json")], [str(a), str(tmp_path / "broken.json")], [str(a)],
             [str(a), str(b), "--fail-if", "latency_increase>>1"]]
    for args in cases[:-1]:
        out = CliRunner().invoke(app, ["compare", *args])
        assert out.exit_code == 2, (args, out.output)
        lines = [ln for ln in out.stderr.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith("error:"), (args, out.stderr)
    # The real entry point, as CI would call it: exit 2, one line, no traceback.
    proc = subprocess.run([sys.executable, "-m", "compress", "compare", *cases[-1]], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("error: --fail-if 'latency_increase>>1'")
