"""The run directory's one owner (compress.rundir): round trip, the previous format, and clear refusals."""

import json
from dataclasses import asdict

import pytest

from compress import rundir
from compress.context import Artifact
from compress.io import sha256_file


def old_manifest(stage_dir, key="k1") -> dict:
    """A manifest exactly as the pipeline wrote it before compress.rundir (no `format`, no `engines`)."""
    stage_dir.mkdir(parents=True, exist_ok=True)
    model = stage_dir / "model.pt"
    model.write_bytes(b"weights")
    art = Artifact(name=stage_dir.name, stage="train", parent=None, model="resnet8", files={"model": str(model)},
                   params=10, macs=20, metrics={"best_accuracy": 50.0})
    manifest = {"status": "done", "key": key, "stage": stage_dir.name, "config": {"type": "train"},
                "inputs": {}, "teachers": [], "outputs": {"model": sha256_file(model)},
                "versions": {"compress": "0.x"}, "data": {"preprocess": {"mode": "L"}}, "wall_seconds": 1.5,
                "processes": 1, "finished": "2026-11-01T00:00:00+00:00", "artifact": asdict(art)}
    (stage_dir / "manifest.json").write_text(json.dumps(manifest))
    return manifest


def test_previous_format_loads_and_engines_fall_back_to_the_conventional_path(tmp_path):
    old = old_manifest(tmp_path / "t")
    m = rundir.read_stage(tmp_path / "t")
    assert m.key == "k1" and m.artifact.files == old["artifact"]["files"] and m.outputs == old["outputs"]
    assert m.data == old["data"] and m.engines == {}
    assert m.engine_file(tmp_path, "fp16") == tmp_path / "t" / "engines" / "fp16.plan"


def test_round_trip_and_engines_recorded(tmp_path):
    old_manifest(tmp_path / "t")
    m = rundir.read_stage(tmp_path / "t")
    rundir.write_stage(tmp_path / "t", m)
    assert json.loads((tmp_path / "t" / "manifest.json").read_text())["format"] == rundir.FORMAT
    plan = rundir.engine_path(tmp_path, "t", "int8")
    plan.parent.mkdir()
    plan.write_bytes(b"engine")
    rundir.record_engines(tmp_path, {"t": {"int8": {"status": "ok", "reason": None, "engine": str(plan),
                                                    "build_s": 2.0},
                                           "fp16": {"status": "skipped", "reason": "no GPU"}},
                                     "not-on-disk": {"fp16": {"status": "skipped", "reason": "no GPU"}}})
    again = rundir.read_stage(tmp_path / "t")
    assert again.engines["int8"].engine == str(plan) and again.engines["fp16"].reason == "no GPU"
    assert again.engine_file(tmp_path, "int8") == plan
    assert again.artifact == m.artifact


@pytest.mark.parametrize("edit,error,text", [
    (lambda m: m.update(format="compress.stage/99"), rundir.RunDirError, "manifest format 'compress.stage/99'"),
    (lambda m: m.update(status="running"), rundir.StageUnfinished, "did not finish"),
    (lambda m: m["artifact"].update(files=["model.pt"]), rundir.RunDirError, "not a stage manifest"),
    (lambda m: m.update(outputs="abc"), rundir.RunDirError, "outputs must be a mapping"),
    (lambda m: m["artifact"].update(colour="red"), rundir.RunDirError, "not a stage manifest"),
])
def test_refusals_are_one_line(tmp_path, edit, error, text):
    m = old_manifest(tmp_path / "t")
    edit(m)
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(error) as info:
        rundir.read_stage(tmp_path / "t")
    assert text in str(info.value) and "\n" not in str(info.value)


def test_missing_or_torn_manifest_is_no_manifest(tmp_path):
    with pytest.raises(rundir.NoManifest):
        rundir.read_stage(tmp_path / "nothing")
    old_manifest(tmp_path / "t")
    (tmp_path / "t" / "manifest.json").write_text('{"status": "do')
    with pytest.raises(rundir.NoManifest, match="unreadable"):
        rundir.read_stage(tmp_path / "t")


def test_cache_check_reuses_an_old_run_directory_and_refuses_a_newer_one(tmp_path):
    from compress.pipeline import _cached

    old_manifest(tmp_path / "t", key="k1")
    art, why = _cached(tmp_path / "t", "k1")
    assert art is not None and art.files["model"] == str(tmp_path / "t" / "model.pt") and why == ""
    assert _cached(tmp_path / "t", "another key") == (None, "")
    m = json.loads((tmp_path / "t" / "manifest.json").read_text())
    m["format"] = "compress.stage/99"
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    art, why = _cached(tmp_path / "t", "k1")
    assert art is None and "compress.stage/99" in why


def test_deploy_reads_through_rundir_and_words_a_newer_format(tmp_path):
    from compress.deploy import DeployError, _stage_manifest

    m = old_manifest(tmp_path / "t")
    assert _stage_manifest(tmp_path, "t").artifact.name == "t"
    m["format"] = "compress.stage/99"
    (tmp_path / "t" / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(DeployError) as info:
        _stage_manifest(tmp_path, "t")
    assert "compress.stage/99" in str(info.value) and "--force t" in str(info.value)
