"""Hostile `compress deploy` arguments (issue 17, items 1 and 2): nothing is ever written outside --out.

A run directory is made by hand (a stage manifest, an ONNX file and a report), so these tests need no
training: deploy copies the ONNX and writes text files; it does not load the model for these targets.
"""

import hashlib
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress.cli import app

PRE = {"size": [8, 8], "channels": 1, "layout": "NCHW", "dtype": "float32", "scale": 1 / 255, "mean": [0.5],
       "std": [0.25], "class_names": ["a", "b"]}


def make_run(root: Path, name: str = "p", stage: str = "teacher") -> tuple[Path, Path]:
    """(run directory, report directory) as a finished pipeline leaves them."""
    stage_dir = root / "runs" / name / stage
    stage_dir.mkdir(parents=True)
    onnx = stage_dir / "model.onnx"
    onnx.write_bytes(b"an onnx model of " + name.encode())
    (stage_dir / "model.pt").write_bytes(b"weights")
    sha = hashlib.sha256(onnx.read_bytes()).hexdigest()
    (stage_dir / "manifest.json").write_text(json.dumps({
        "status": "done", "key": "k", "stage": stage, "outputs": {"onnx": sha}, "data": {"preprocess": PRE},
        "artifact": {"name": stage, "stage": "train", "parent": None, "model": "resnet8", "precision": "fp32",
                     "files": {"onnx": str(onnx)}, "params": 1, "macs": 1}}))
    report_dir = root / "reports" / name
    report_dir.mkdir(parents=True)
    (report_dir / "report.json").write_text(json.dumps({
        "schema": "compress.report/1", "pipeline": {"name": name, "config": {}}, "run_dir": str(root / "runs" / name),
        "artifacts": [{"name": stage, "runtime": "onnxruntime", "precision": "fp32", "status": "ok",
                       "accuracy": 90.0, "latency_ms": {"1": {"p50": 0.1}}}], "data": {"preprocess": PRE}}))
    return root / "runs" / name, report_dir


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): (hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir")
            for p in sorted(root.rglob("*"))}


def deploy(*args) -> "object":
    return CliRunner().invoke(app, ["deploy", *map(str, args)])


def assert_refused(res, expect: str = "") -> None:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and expect in lines[0], res.stderr
    assert "Traceback" not in res.output


@pytest.fixture
def world(tmp_path, monkeypatch):
    """Two runs side by side (the second is the one a hostile artifact name points at), cwd = tmp_path/work."""
    run, report = make_run(tmp_path / "a")
    other, _ = make_run(tmp_path / "b", name="victim")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    return {"root": tmp_path, "run": run, "report": report, "other": other}


# Item 1: the example is `--artifact ../../../<somewhere>/runs/NAME/STAGE --target triton`.
@pytest.mark.parametrize("artifact", [
    "../../b/runs/victim/teacher", "../../../b/runs/victim/teacher", "{other}/teacher", "teacher/../teacher",
    "..", ".", "", "teacher/", "teacher\0x", "teacher/manifest.json", "teach?r", "teacher " * 50,
])
@pytest.mark.parametrize("target", ["triton", "onnx"])
def test_artifact_names_name_an_artifact_of_the_run(world, artifact, target):
    artifact = artifact.format(other=world["other"])
    before = snapshot(world["root"])
    out = world["root"] / "work" / "bundle"
    res = deploy(world["run"], "--artifact", artifact, "--target", target, "--out", out)
    assert_refused(res, "no artifact")
    assert snapshot(world["root"]) == before  # the victim's manifest.json, and everything else, untouched


# Item 2: `--out RUN --force` replaced the run directory with the bundle.
@pytest.mark.parametrize("where", ["run", "run/teacher", "run/teacher/new", "a", "a/runs", "report", "report/x",
                                   "a/reports", "root", "work", ".", "/"])
@pytest.mark.parametrize("force,source", [(True, "run"), (False, "report")])
def test_out_is_never_a_source_nor_inside_nor_above_one(world, where, force, source):
    out = {"run": world["run"], "run/teacher": world["run"] / "teacher", "a": world["root"] / "a",
           "run/teacher/new": world["run"] / "teacher" / "new", "a/runs": world["root"] / "a" / "runs",
           "report": world["report"], "report/x": world["report"] / "x", "a/reports": world["root"] / "a" / "reports",
           "root": world["root"], "work": world["root"] / "work", ".": Path("."), "/": Path("/")}[where]
    (world["root"] / "work" / "mine.txt").write_text("the user's own file")
    before = snapshot(world["root"])
    res = deploy(world[source], "--artifact", "teacher", "--target", "onnx", "--out", out,
                 *(["--force"] if force else []))
    assert_refused(res)
    assert "--force" not in res.stderr or "never replaces" in res.stderr  # no advice to force it
    assert snapshot(world["root"]) == before


def test_out_under_a_file_is_one_line(world):
    (world["root"] / "work" / "f").write_text("x")
    before = snapshot(world["root"])
    assert_refused(deploy(world["run"], "--artifact", "teacher", "--target", "onnx", "--out", "f/bundle"),
                   "not a directory")
    assert snapshot(world["root"]) == before


def test_a_good_deploy_writes_only_under_out(world):
    before = snapshot(world["root"])
    for target in ("onnx", "triton"):
        out = world["root"] / "work" / f"dist-{target}"
        res = deploy(world["report"], "--artifact", "teacher", "--target", target, "--out", out)
        assert res.exit_code == 0, res.output
    after = snapshot(world["root"])
    changed = {k for k in after if before.get(k) != after[k]} | {k for k in before if k not in after}
    assert changed and all(k.startswith("work/dist-") for k in changed), changed
    assert (world["root"] / "work" / "dist-triton" / "teacher" / "1" / "model.onnx").is_file()


@pytest.mark.parametrize("manifest", [
    [], {"status": "done", "artifact": []}, {"status": "done", "artifact": {"files": ["x"]}},
    {"status": "done", "artifact": {"files": {"onnx": 3}}}, {"status": "done", "artifact": {"files": {}}},
    {"status": "done", "artifact": {"files": {"onnx": "/nonexistent/model.onnx"}}},
    {"status": "done", "artifact": {"files": {"onnx": "model.onnx"}}, "data": {"preprocess": {"channels": "x"}}},
])
def test_malformed_manifests_are_one_line(world, manifest):
    (world["run"] / "teacher" / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(world["root"])
    res = deploy(world["run"], "--artifact", "teacher", "--target", "onnx", "--out", "dist",
                 "--reports", world["root"] / "nowhere")
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert snapshot(world["root"]) == before


@pytest.mark.parametrize("report", [
    [], {"schema": "compress.report/1"}, {"schema": "compress.report/1", "pipeline": [], "artifacts": []},
    {"schema": "compress.report/1", "pipeline": {"name": 3}, "artifacts": []},
    {"schema": "compress.report/1", "pipeline": {"name": "p"}, "artifacts": [{"name": "teacher"}]},
    {"schema": "compress.report/1", "pipeline": {"name": "p"}, "artifacts": "many", "run_dir": 7},
])
def test_malformed_reports_are_one_line(world, report):
    (world["report"] / "report.json").write_text(json.dumps(report))
    before = snapshot(world["root"])
    res = deploy(world["report"], "--artifact", "teacher", "--target", "onnx", "--out", "dist")
    assert res.exit_code == 2, (res.output, res.exception)
    assert len(res.stderr.strip().splitlines()) == 1 and "Traceback" not in res.output
    assert snapshot(world["root"]) == before


SEGMENTS = st.sampled_from(["..", ".", "runs", "p", "teacher", "victim", "a", "b", "reports", "work", "x", "1"])


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(artifact=st.lists(SEGMENTS, min_size=1, max_size=5).map("/".join) | st.text(max_size=12),
       out=st.lists(SEGMENTS, min_size=0, max_size=5).map("/".join), absolute=st.booleans(),
       target=st.sampled_from(["onnx", "triton", "jetson"]), force=st.booleans(), source=st.sampled_from(["run", "report"]))
def test_deploy_writes_nothing_outside_out(tmp_path, monkeypatch, artifact, out, absolute, target, force, source):
    import tempfile

    root = Path(tempfile.mkdtemp(dir=tmp_path))  # a fresh world for every example
    run, report = make_run(root / "a")
    make_run(root / "b", name="victim")
    (root / "work").mkdir()
    monkeypatch.chdir(root / "work")
    out_path = (root / out) if absolute else Path(out or ".")
    resolved = (root / "work" / out_path).resolve()
    before = snapshot(root)
    res = deploy({"run": run, "report": report}[source], "--artifact", artifact, "--target", target,
                 "--out", out_path, *(["--force"] if force else []))
    assert res.exit_code in (0, 1, 2), (res.output, res.exception)
    assert len(res.stderr.strip().splitlines()) <= 1 and "Traceback" not in res.output
    after = snapshot(root)
    for key in set(before) | set(after):
        if before.get(key) != after.get(key):
            path = (root / key).resolve()
            created_parent = after.get(key) == "dir" and key not in before and path in resolved.parents
            assert created_parent or path == resolved or resolved in path.parents, (key, out_path, res.output)
