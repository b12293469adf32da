"""Issue 17, item 3: two pipeline files with the same `name:` must not overwrite each other's run
directory or report. The run directory records its owner (compress.rundir, run.json)."""

import hashlib
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from compress import rundir
from compress.cli import app

PIPELINE = ("name: same\ndevice: cpu\ndata: {{dataset: synthetic, synthetic: {{num_train: 32, num_test: 8, "
            "image_size: 8}}, val_size: 8, batch_size: 8}}\nexport: {{parity_images: 4}}\n"
            "benchmark: {{runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1}}\n"
            "stages:\n  t: {{type: train, model: {model}, epochs: 1}}\n")


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file() and p.name != ".lock"}


def run(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


@pytest.fixture
def first(tmp_path):
    """Pipeline a/p.yaml ran in runs/same and wrote reports/same (made by hand: no training needed, since
    ownership is checked before anything runs); b/p.yaml is another file with the same name."""
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    (tmp_path / "a" / "p.yaml").write_text(PIPELINE.format(model="resnet8"))
    (tmp_path / "b" / "p.yaml").write_text(PIPELINE.format(model="resnet20"))
    stage = tmp_path / "runs" / "same" / "t"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text('{"status": "done", "key": "k"}\n')
    (stage / "model.pt").write_bytes(b"weights of pipeline a")
    rundir.claim(tmp_path / "runs" / "same", tmp_path / "a" / "p.yaml")
    (tmp_path / "reports" / "same").mkdir(parents=True)
    (tmp_path / "reports" / "same" / "report.json").write_text(json.dumps(
        {"schema": "compress.report/1", "run_dir": str(tmp_path / "runs" / "same")}))
    return tmp_path


def test_a_finished_stage_records_the_owner_and_a_failed_one_writes_nothing(tmp_path, monkeypatch):
    from compress.stages import engine

    (tmp_path / "net.py").write_text("import torch\nclass Net(torch.nn.Module):\n"  # a model with no parameters
                                     "    def __init__(self, num_classes):\n        super().__init__()\n")
    (tmp_path / "bad.yaml").write_text(PIPELINE.format(model="net.py:Net"))
    res = run(tmp_path / "bad.yaml", "--out", tmp_path / "runs", "--reports", tmp_path / "reports")
    assert res.exit_code == 2 and "has no parameters" in res.stderr, res.output
    assert rundir.owner(tmp_path / "runs" / "same") is None
    # A good stage finishes; the run is then stopped before the engines (no benchmark or report needed here).
    monkeypatch.setattr(engine, "run", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt("stopped")))
    (tmp_path / "p.yaml").write_text(PIPELINE.format(model="resnet8"))
    res = run(tmp_path / "p.yaml", "--out", tmp_path / "runs", "--reports", tmp_path / "reports", "--no-progress")
    assert res.exit_code == 130, res.output
    assert rundir.owner(tmp_path / "runs" / "same") == str((tmp_path / "p.yaml").resolve())
    record = json.loads((tmp_path / "runs" / "same" / "run.json").read_text())
    assert record["format"] == rundir.RUN_FORMAT and record["name"] == "same"
    line = one_error(run(tmp_path / "bad.yaml", "--out", tmp_path / "runs", "--reports", tmp_path / "reports"))
    assert "belongs to another pipeline file" in line


def one_error(res) -> str:
    assert res.exit_code == 2, (res.exit_code, res.output, res.exception)
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "Traceback" not in res.output, res.stderr
    return lines[0]


def test_another_pipeline_with_the_same_name_is_refused(first):
    before = snapshot(first)
    line = one_error(run(first / "b" / "p.yaml", "--out", first / "runs", "--reports", first / "reports"))
    assert "belongs to another pipeline file with the same name" in line and "--out" in line and "--adopt" in line
    assert snapshot(first) == before


def test_its_report_directory_is_protected_too(first):
    before = snapshot(first)
    line = one_error(run(first / "b" / "p.yaml", "--out", first / "other-runs", "--reports", first / "reports"))
    assert "holds the report of the run in" in line and "--reports" in line
    assert snapshot(first) == before and not (first / "other-runs").exists()


def test_a_damaged_record_is_one_line(first):
    record = first / "runs" / "same" / "run.json"
    for junk in ("[1, 2]", '{"format": "x"}', "not json"):
        record.write_text(junk)
        before = snapshot(first)
        line = one_error(run(first / "a" / "p.yaml", "--out", first / "runs", "--reports", first / "reports"))
        assert "run.json" in line and "--adopt" in line
        assert snapshot(first) == before


def test_adopt_takes_the_run_directory_over(tmp_path):
    run_dir = tmp_path / "runs" / "same"
    run_dir.mkdir(parents=True)
    a, b = tmp_path / "a.yaml", tmp_path / "b.yaml"
    rundir.claim(run_dir, a)
    with pytest.raises(rundir.RunOwnedError):
        rundir.check_owner(run_dir, None, b)
    rundir.check_owner(run_dir, None, b, adopt=True)
    rundir.claim(run_dir, b)
    assert rundir.owner(run_dir) == str(b.resolve())
    rundir.check_owner(run_dir, None, b)
    with pytest.raises(rundir.RunOwnedError):
        rundir.check_owner(run_dir, None, a)
