"""Property (issue 17): random bytes, random YAML structures and random `--set` values given to `run`,
`validate`, `compare` and `deploy` end in exit 0, 1 or 2, with at most one line on stderr and never
a traceback.

Bounded to stay fast: `run` gets a dataset root that does not exist, so even a config that validates
stops when the data is looked for (it never trains); examples are few and run in-process.
"""

import json
import math
import tempfile
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress.cli import app

SETTINGS = settings(max_examples=20, deadline=None, suppress_health_check=list(HealthCheck))
KEYS = ["name", "seed", "device", "data", "dataset", "root", "stages", "t", "s", "type", "train", "distill",
        "prune", "quantize", "from", "model", "resnet8", "epochs", "lr", "batch_size", "temperature", "alpha",
        "weight_decay", "export", "opset", "benchmark", "batch_sizes", "engine", "report", "dir", "target_macs",
        "synthetic", "image_size", "num_train", "tracking", "pipeline", "artifacts", "runtime", "precision",
        "accuracy", "latency_ms", "p50", "schema", "compress.report/1", "status", "ok", "1"]
SCALARS = (st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
           | st.sampled_from(KEYS) | st.text(max_size=20))
STRUCTURES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=4)
                          | st.dictionaries(st.sampled_from(KEYS) | st.text(max_size=8), inner, max_size=5),
                          max_leaves=25)
BASE = ("name: x\ndevice: cpu\ndata: {dataset: imagefolder, root: /nonexistent/compress-hostile}\n"
        "stages:\n  t: {type: train, model: resnet8, epochs: 1}\n")
SET_KEYS = st.sampled_from(["name", "seed", "device", "data.batch_size", "data", "stages", "stages.t",
                            "stages.t.epochs", "stages.t.lr", "stages.t.type", "stages.t.from", "stages.t.model",
                            "export.opset", "benchmark.batch_sizes", "data.augment.hflip", "report.dir", "x.y",
                            "stages.t.temperature", ".", "a..b", "tracking"])
SET_VALUES = (st.text(max_size=30) | STRUCTURES.map(lambda v: yaml.safe_dump(v, default_flow_style=True).strip())
              | st.sampled_from(["true", ".inf", "-.nan", "1e400", "99999999999999999999", "[&a [1], *a]", "*a",
                                 "{a: 1, a: 2}", "!!python/object:os.system x", "\0", "~", "[]", "{}", "'"]))


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def assert_contained(res) -> None:
    assert res.exit_code in (0, 1, 2), (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output, res.output
    assert len([line for line in res.stderr.splitlines() if line.strip()]) <= 1, res.stderr


def workdir() -> Path:
    return Path(tempfile.mkdtemp(prefix="hostile-"))


def dump(value) -> str:
    try:
        return yaml.safe_dump(value, default_flow_style=False, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return repr(value)


@SETTINGS
@given(data=st.binary(max_size=400) | STRUCTURES.map(dump).map(str.encode)
       | st.lists(st.sampled_from([b"name: x\n", b"stages:\n", b"  t: {type: train, model: resnet8}\n", b"&a ",
                                   b"*a\n", b"- ", b"  ", b"\t", b"\xff", b"key: [", b"!!binary ", b": :"]),
                  max_size=8).map(b"".join))
def test_random_pipeline_files(data):
    tmp = workdir()
    (tmp / "p.yaml").write_bytes(data)
    for command in ("validate", "run"):
        extra = ["--out", tmp / "runs", "--reports", tmp / "rep"] if command == "run" else []
        assert_contained(invoke(command, tmp / "p.yaml", *extra))
    assert not (tmp / "rep").exists()


@SETTINGS
@given(sets=st.lists(st.tuples(SET_KEYS | st.text(max_size=10), SET_VALUES).map("=".join) | st.text(max_size=20),
                     max_size=3))
def test_random_set_values(sets):
    tmp = workdir()
    (tmp / "p.yaml").write_text(BASE)
    args = [a for s in sets for a in ("--set", s)]
    assert_contained(invoke("validate", tmp / "p.yaml", *args))
    never_trains = ["--set", "data.dataset=imagefolder", "--set", "data.root=/nonexistent/compress-hostile"]
    assert_contained(invoke("run", tmp / "p.yaml", *args, *never_trains, "--out", tmp / "runs", "--reports", tmp / "rep"))
    assert not (tmp / "rep").exists()


REPORT = {"schema": "compress.report/1", "pipeline": {"name": "p"}, "artifacts": [
    {"name": "t", "runtime": "torch", "precision": "fp32", "status": "ok", "accuracy": 90.0,
     "latency_ms": {"1": {"p50": 1.0}}}]}


def mutate(value, patch):
    """REPORT with one random structure put somewhere inside it."""
    path, new = patch
    if not path or not isinstance(value, (dict, list)) or not value:
        return new
    if isinstance(value, dict):
        key = sorted(value)[path[0] % len(value)]
        return {**value, key: mutate(value[key], (path[1:], new))}
    i = path[0] % len(value)
    return value[:i] + [mutate(value[i], (path[1:], new))] + value[i + 1:]


def to_json(value) -> bytes:
    try:
        return json.dumps(value).encode()
    except (ValueError, TypeError):
        return b"{"


REPORTS = (st.binary(max_size=200) | STRUCTURES.map(to_json)
           | st.tuples(st.lists(st.integers(0, 7), max_size=5), STRUCTURES).map(lambda p: to_json(mutate(REPORT, p))))


@SETTINGS
@given(reports=st.lists(REPORTS, min_size=2, max_size=3), gate=st.sampled_from([[], ["--fail-if", "accuracy_drop>0"]]))
def test_random_reports_to_compare(reports, gate):
    tmp = workdir()
    paths = []
    for i, data in enumerate(reports):
        paths.append(tmp / f"r{i}.json")
        paths[-1].write_bytes(data)
    assert_contained(invoke("compare", *paths, *gate, "--plot", tmp / "plot.png"))


@SETTINGS
@given(report=REPORTS, manifest=REPORTS | st.tuples(st.lists(st.integers(0, 7), max_size=4), STRUCTURES).map(
    lambda p: to_json(mutate({"status": "done", "artifact": {"files": {"onnx": "model.onnx"}, "precision": "fp32"},
                              "data": {"preprocess": {"channels": 1, "size": [8, 8]}}}, p))),
       artifact=st.sampled_from(["t", "..", "t/..", "x"]) | st.text(max_size=10),
       target=st.sampled_from(["onnx", "triton", "jetson", "tflite"]))
def test_random_runs_and_reports_to_deploy(report, manifest, artifact, target):
    tmp = workdir()
    (tmp / "runs" / "p" / "t").mkdir(parents=True)
    (tmp / "runs" / "p" / "t" / "manifest.json").write_bytes(manifest)
    (tmp / "runs" / "p" / "t" / "model.onnx").write_bytes(b"onnx")
    (tmp / "reports" / "p").mkdir(parents=True)
    (tmp / "reports" / "p" / "report.json").write_bytes(report)
    for source in (tmp / "runs" / "p", tmp / "reports" / "p"):
        res = invoke("deploy", source, "--artifact", artifact, "--target", target, "--out", tmp / "dist",
                     "--runs", tmp / "runs", "--reports", tmp / "reports")
        assert_contained(res)
        assert not math.isnan(res.exit_code)
