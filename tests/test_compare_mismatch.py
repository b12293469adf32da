"""`compress compare` says when pipelines, datasets or models differ, and keeps deltas of rows
that compare different models or data out of the table and the gates unless asked."""

from __future__ import annotations

import json
import re

from typer.testing import CliRunner

from compress.cli import app
from compress.compare import check_gates, compare, load_report, parse_gate


def row(name, model, acc, p50):
    return {"name": name, "stage": "train", "parent": None, "model": model, "runtime": "onnxruntime",
            "precision": "fp32", "device": "cpu", "params": 1, "macs": 1, "size_bytes": 1, "accuracy": acc,
            "latency_ms": {"1": {"p50": p50}}, "throughput_ips": {}, "status": "ok", "reason": None}


def report(rows, pipeline="p", dataset="fashion-mnist", fingerprint="f" * 64, cpu="AMD EPYC", gpu=None,
           config=None):
    return {"schema": "compress.report/1", "created": "2026-01-01T00:00:00+00:00",
            "pipeline": {"name": pipeline, "config": config or {"seed": 0}},
            "machine": {"cpu": cpu, "gpu": gpu, "cores": 2, "versions": {"torch": "2.13.0"}},
            "data": {"name": dataset, "fingerprint": fingerprint, "num_test": 100}, "artifacts": rows}


def write(tmp_path, name, rep):
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(rep))
    return load_report(path)


def test_same_pipeline_and_data_compares_with_deltas(tmp_path):
    a = write(tmp_path, "a", report([row("teacher", "resnet20", 90.0, 1.0)]))
    b = write(tmp_path, "b", report([row("teacher", "resnet20", 89.0, 2.0)]))
    cmp = compare([a, b])
    assert cmp.warnings == [] and cmp.mismatched == set()
    assert [round(d, 6) for d, _, _ in cmp.accuracy_deltas()] == [1.0]
    assert check_gates(cmp, [parse_gate("accuracy_drop>0.5")])  # the 1-point drop is gated


def test_different_models_warn_and_drop_deltas(tmp_path):
    # the case seen: a resnet8 on synthetic data and a resnet20 on Fashion-MNIST, both `teacher`
    a = write(tmp_path, "a", report([row("teacher", "resnet8", 50.0, 0.1), row("s", "mnv2", 80.0, 0.2)],
                                    pipeline="smoke", dataset="synthetic", fingerprint="0" * 64))
    b = write(tmp_path, "b", report([row("teacher", "resnet20", 90.0, 1.0), row("s", "mnv2", 85.0, 0.3)]))
    cmp = compare([a, b])
    text = "\n".join(cmp.warnings)
    assert "pipelines differ: A smoke, B p" in text
    assert "datasets differ" in text and "synthetic" in text and "fashion-mnist" in text
    assert "teacher (onnxruntime, fp32): models differ: A resnet8, B resnet20" in text
    assert cmp.mismatched == {("teacher", "onnxruntime", "fp32"), ("s", "onnxruntime", "fp32")}  # data differ: all
    assert cmp.accuracy_deltas() == [] and cmp.latency_deltas() == []
    # a gate with nothing comparable fails rather than passing silently
    assert check_gates(cmp, [parse_gate("accuracy_drop>0.5")])[0].startswith("accuracy_drop>0.5: no artifact")
    asked = compare([a, b], include_mismatched=True)
    assert len(asked.accuracy_deltas()) == 2 and asked.warnings == cmp.warnings


def test_only_the_row_whose_model_differs_is_held_back(tmp_path):
    a = write(tmp_path, "a", report([row("teacher", "resnet8", 50.0, 0.1), row("s", "mnv2", 80.0, 0.2)]))
    b = write(tmp_path, "b", report([row("teacher", "resnet20", 90.0, 1.0), row("s", "mnv2", 79.0, 0.2)]))
    cmp = compare([a, b])
    assert cmp.mismatched == {("teacher", "onnxruntime", "fp32")}
    assert [(round(d, 6), k[0]) for d, k, _ in cmp.accuracy_deltas()] == [(1.0, "s")]
    assert not any("pipelines differ" in w or "datasets differ" in w for w in cmp.warnings)


def test_same_pipeline_name_with_other_settings_is_said(tmp_path):
    a = write(tmp_path, "a", report([row("t", "m", 1.0, 1.0)], config={"seed": 0, "data": {"batch_size": 256}}))
    b = write(tmp_path, "b", report([row("t", "m", 1.0, 1.0)], config={"seed": 1, "data": {"batch_size": 256}}))
    assert compare([a, b]).warnings == ["pipeline p: the configs differ in seed"]


def test_cli_shows_machines_side_by_side_and_the_flag(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(report([row("teacher", "resnet8", 50.0, 0.1)], cpu="[bold]Xeon")))
    (tmp_path / "b.json").write_text(json.dumps(report([row("teacher", "resnet20", 90.0, 1.0)], gpu="H200")))
    runner = CliRunner()
    res = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    assert res.exit_code == 0, res.output
    out = res.output
    assert "machines" in out and "[bold]Xeon" in out and "H200" in out  # file text shown, not read as markup
    assert re.search(r"warning: teacher \(onnxruntime, fp32\): models differ", out)
    assert "(+40.00)" not in out and "(differs)" in out
    res = runner.invoke(app, ["compare", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--include-mismatched"])
    assert res.exit_code == 0 and "(+40.00)" in res.output


def test_a_config_key_only_one_version_has_is_no_difference(tmp_path):
    a = write(tmp_path, "a", report([row("t", "m", 1.0, 1.0)], config={"seed": 0}))
    b = write(tmp_path, "b", report([row("t", "m", 1.0, 1.0)], config={"seed": 0, "data": {"blur": 0.0}}))
    assert compare([a, b]).warnings == []
