"""The command line: version, help with examples, validate, models, and one-line errors with exit 2."""

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def compress(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "compress", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def test_version_and_help_teach():
    import compress as pkg

    out = compress("--version")
    assert out.returncode == 0 and out.stdout.strip() == f"compress {pkg.__version__}"
    help_ = compress("run", "--help")
    assert help_.returncode == 0
    assert "compress run pipelines/distill.yaml" in help_.stdout and "--set" in help_.stdout


def test_validate_prints_the_stage_graph():
    out = compress("validate", "pipelines/distill.yaml")
    assert out.returncode == 0, out.stderr
    assert "ok" in out.stdout and "distill" in out.stdout


@pytest.mark.parametrize("text,expect", [
    ("name: x\nstages:\n  t: {type: train, model: resnet8, epoch: 1}\n", "p.yaml:3: stages.t.epoch: unknown key"),
    ("name: x\nstages: [\n", "malformed YAML"),
])
def test_bad_pipeline_is_one_line_exit_2(tmp_path, text, expect):
    (tmp_path / "p.yaml").write_text(text)
    for command in (["validate"], ["run", "--out", str(tmp_path / "runs")]):
        out = compress(*command, str(tmp_path / "p.yaml"))
        assert out.returncode == 2
        assert "Traceback" not in out.stderr
        lines = [ln for ln in out.stderr.strip().splitlines() if ln.strip()]
        assert len(lines) == 1 and expect in lines[0], out.stderr
    assert not (tmp_path / "runs").exists()


def test_unknown_model_and_missing_data_are_one_line_errors(tmp_path):
    p = tmp_path / "p.yaml"
    p.write_text("name: x\ndata: {dataset: synthetic, val_size: 64}\nstages:\n  t: {type: train, model: resnet21}\n")
    out = compress("run", str(p), "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "rep"))
    assert out.returncode == 2 and "unknown model 'resnet21'; did you mean 'resnet20'?" in out.stderr
    assert "Traceback" not in out.stderr
    p.write_text(f"name: x\ndata: {{root: {tmp_path / 'nothing'}}}\nstages:\n  t: {{type: train, model: resnet8}}\n")
    out = compress("run", str(p), "--out", str(tmp_path / "runs"), "--reports", str(tmp_path / "rep"))
    assert out.returncode == 2 and "Traceback" not in out.stderr and "nothing" in out.stderr


def test_models_lists_the_registry_with_macs():
    out = compress("models", "resnet2*", "--input-size", "1,28,28")
    assert out.returncode == 0, out.stderr
    assert "resnet20" in out.stdout and "MACs" in out.stdout and "mobilenet" not in out.stdout
