"""`compress deploy`: bundles from a real (tiny) run, whose infer.py must predict what the model predicts."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compress import deploy as deploy_mod
from compress.cli import app
from compress.deploy import deploy
from compress.io import sha256_file

ROOT = Path(__file__).parents[1]
PIPELINE = """\
name: deploy-test
seed: 0
data:
  dataset: synthetic
  synthetic: {num_train: 256, num_test: 64, num_classes: 4, image_size: 16, channels: 1}
  batch_size: 32
  val_size: 64
stages:
  teacher:      {type: train, model: resnet8, epochs: 3, lr: 0.05}
  teacher-int8: {type: quantize, from: teacher, calibration_size: 32}
export: {parity_images: 16}
engine: {opt_batch: 8, max_batch: 32}
benchmark: {runtimes: [onnxruntime, tensorrt], batch_sizes: [1], warmup: 1, iters: 2}
"""
N_IMAGES = 16


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """One pipeline run (train + quantize), its report, and test images written as PNGs."""
    from PIL import Image

    from compress import config
    from compress.data import build_data, synthetic

    tmp = tmp_path_factory.mktemp("deploy")
    (tmp / "p.yaml").write_text(PIPELINE)
    proc = subprocess.run([sys.executable, "-m", "compress", "run", str(tmp / "p.yaml"), "--out", str(tmp / "runs"),
                           "--reports", str(tmp / "reports")], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = config.load(tmp / "p.yaml")
    raw = synthetic.load(cfg.data, lambda m: None)
    x = raw.test_x[:N_IMAGES]
    images = []
    for i, img in enumerate(x):
        images.append(tmp / f"img{i}.png")
        Image.fromarray(img[0]).save(images[-1])
    data = build_data(cfg.data, "cpu", cfg.seed)
    return {"tmp": tmp, "runs": tmp / "runs", "run_dir": tmp / "runs" / "deploy-test",
            "report": tmp / "reports" / "deploy-test", "images": images, "x": data.normalize(torch.from_numpy(x)),
            "data": data}


def predict_torch(run, artifact):
    from compress.io import load_model

    model = load_model(run["run_dir"] / artifact / "model.pt").eval()
    with torch.no_grad():
        return model(run["x"]).argmax(1).tolist()


def predict_onnx(run, path):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {"input": run["x"].numpy()})[0].argmax(1).tolist()


def infer(bundle_dir, images, *extra):
    proc = subprocess.run([sys.executable, "infer.py", *map(str, images), *extra], cwd=bundle_dir,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def infer_json(bundle_dir, images):
    return [json.loads(line) for line in infer(bundle_dir, images, "--json").stdout.splitlines()]


def check_manifest(home, run):
    m = json.loads((home / "manifest.json").read_text())
    shipped = sorted(str(p.relative_to(home)) for p in home.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == shipped
    for rel, digest in m["files"].items():
        assert sha256_file(home / rel) == digest, rel
    assert m["labels"] == run["data"].class_names == (home / "labels.txt").read_text().split()
    pre = m["preprocess"]
    assert pre["size"] == [16, 16] and pre["channels"] == 1 and pre["layout"] == "NCHW"
    assert pre["mean"] == pytest.approx(run["data"].mean) and pre["std"] == pytest.approx(run["data"].std)
    assert pre["scale"] == pytest.approx(1 / 255)
    return m


def test_onnx_bundle_predicts_what_the_model_predicts(run, tmp_path):
    out = deploy(run["report"], "teacher", "onnx", tmp_path / "b", log=lambda m: None)
    assert sorted(p.name for p in out.iterdir()) == ["README.txt", "infer.py", "labels.txt", "manifest.json",
                                                     "model.onnx"]
    m = check_manifest(out, run)
    assert m["precision"] == "fp32" and m["artifact"]["name"] == "teacher" and m["target"] == "onnx"
    assert m["source"]["files"]["onnx"]["sha256"] == sha256_file(run["run_dir"] / "teacher" / "model.onnx")
    assert m["source"]["preprocess_from"] == "report.json data"
    expected = predict_torch(run, "teacher")
    assert len(set(expected)) > 1   # a model that always says the same class would match anything
    got = infer_json(out, run["images"])
    assert [g["class"] for g in got] == [run["data"].class_names[k] for k in expected]
    assert all(0.25 <= g["probability"] <= 1 for g in got)   # top-1 of 4 classes
    single = infer(out, run["images"][:1]).stdout.split()
    assert single[0] == run["data"].class_names[expected[0]] and 0 < float(single[1]) <= 1


def test_jetson_int8_bundle_from_the_run_directory(run, tmp_path):
    out = deploy(run["run_dir"], "teacher-int8", "jetson", tmp_path / "j", reports=run["report"].parent,
                 log=lambda m: None)
    m = check_manifest(out, run)
    assert m["precision"] == "int8" and not m["engine"]["shipped"]
    assert "no int8 engine was built" in m["engine"]["note"] and "tensorrt" in m["engine"]["note"].lower()
    int8_onnx = run["run_dir"] / "teacher-int8" / "model_int8.onnx"
    assert (out / "model.onnx").read_bytes() == int8_onnx.read_bytes()
    assert not (out / "model.plan").exists() and not (out / "model_fp16.onnx").exists()
    script = (out / "build_engine.sh").read_text()
    assert "--onnx=model.onnx --saveEngine=model.plan --stronglyTyped" in script
    assert "--minShapes=input:1x1x16x16 --optShapes=input:8x1x16x16" in script
    assert "--maxShapes=input:32x1x16x16" in script
    command = "\n".join(line for line in script.splitlines() if not line.startswith("#"))
    assert "--int8" not in command and "--fp16" not in command   # strongly typed: the ONNX decides
    assert (out / "build_engine.sh").stat().st_mode & 0o111
    assert subprocess.run(["bash", "-n", str(out / "build_engine.sh")]).returncode == 0
    # The bundle's ONNX Runtime path gives the INT8 model's own predictions.
    expected = predict_onnx(run, int8_onnx)
    assert [g["index"] for g in infer_json(out, run["images"])] == expected


def test_jetson_fp16_ships_the_fp16_onnx_through_the_cli(run, tmp_path):
    import onnx

    out = tmp_path / "j16"
    res = CliRunner().invoke(app, ["deploy", str(run["report"]), "--artifact", "teacher", "--target", "jetson",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    m = check_manifest(out, run)
    assert m["precision"] == "fp16" and "model_fp16.onnx" in m["files"]
    fp16 = onnx.load(str(out / "model_fp16.onnx"))
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in fp16.graph.initializer)
    assert "--onnx=model_fp16.onnx" in (out / "build_engine.sh").read_text()
    # infer.py on ONNX Runtime uses the FP32 model.onnx; the engine is built from model_fp16.onnx on the device.
    assert [g["index"] for g in infer_json(out, run["images"][:2])] == predict_torch(run, "teacher")[:2]


def triton_model_config():
    """inference.ModelConfig, the subset a generated config uses, with the names and field numbers of
    triton-inference-server/common protobuf/model_config.proto: text_format.Parse rejects any other field."""
    from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

    FD = descriptor_pb2.FieldDescriptorProto
    f = descriptor_pb2.FileDescriptorProto(name="model_config_subset.proto", package="inference", syntax="proto3")
    dt = f.enum_type.add(name="DataType")
    for i, n in enumerate(["INVALID", "BOOL", "UINT8", "UINT16", "UINT32", "UINT64", "INT8", "INT16", "INT32",
                           "INT64", "FP16", "FP32", "FP64", "STRING", "BF16"]):
        dt.value.add(name=f"TYPE_{n}", number=i)

    def add(msg, name, number, type_, repeated=False, type_name=None):
        fld = msg.field.add(name=name, number=number, type=type_,
                            label=FD.LABEL_REPEATED if repeated else FD.LABEL_OPTIONAL)
        if type_name:
            fld.type_name = type_name

    inp = f.message_type.add(name="ModelInput")
    fmt = inp.enum_type.add(name="Format")
    for i, n in enumerate(["FORMAT_NONE", "FORMAT_NHWC", "FORMAT_NCHW"]):
        fmt.value.add(name=n, number=i)
    add(inp, "name", 1, FD.TYPE_STRING)
    add(inp, "data_type", 2, FD.TYPE_ENUM, type_name=".inference.DataType")
    add(inp, "format", 3, FD.TYPE_ENUM, type_name=".inference.ModelInput.Format")
    add(inp, "dims", 4, FD.TYPE_INT64, repeated=True)
    out = f.message_type.add(name="ModelOutput")
    add(out, "name", 1, FD.TYPE_STRING)
    add(out, "data_type", 2, FD.TYPE_ENUM, type_name=".inference.DataType")
    add(out, "dims", 3, FD.TYPE_INT64, repeated=True)
    add(out, "label_filename", 4, FD.TYPE_STRING)
    f.message_type.add(name="ModelDynamicBatching")
    cfg = f.message_type.add(name="ModelConfig")
    add(cfg, "name", 1, FD.TYPE_STRING)
    add(cfg, "platform", 2, FD.TYPE_STRING)
    add(cfg, "max_batch_size", 4, FD.TYPE_INT32)
    add(cfg, "input", 5, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelInput")
    add(cfg, "output", 6, FD.TYPE_MESSAGE, repeated=True, type_name=".inference.ModelOutput")
    add(cfg, "default_model_filename", 8, FD.TYPE_STRING)
    add(cfg, "dynamic_batching", 11, FD.TYPE_MESSAGE, type_name=".inference.ModelDynamicBatching")
    pool = descriptor_pool.DescriptorPool()
    pool.AddSerializedFile(f.SerializeToString())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName("inference.ModelConfig"))


def parse_config(path):
    from google.protobuf import text_format

    return text_format.Parse(path.read_text(), triton_model_config()())


def test_triton_repository_config_and_model(run, tmp_path):
    out = deploy(run["report"] / "report.json", "teacher", "triton", tmp_path / "repo", log=lambda m: None)
    home = out / "teacher"
    assert [p.name for p in out.iterdir()] == ["teacher"]
    assert (home / "1" / "model.onnx").read_bytes() == (run["run_dir"] / "teacher" / "model.onnx").read_bytes()
    check_manifest(home, run)
    cfg = parse_config(home / "config.pbtxt")
    assert cfg.name == "teacher" and cfg.platform == "onnxruntime_onnx" and cfg.max_batch_size == 32
    assert cfg.HasField("dynamic_batching")
    (inp,), (outp,) = cfg.input, cfg.output
    assert (inp.name, list(inp.dims), inp.data_type) == ("input", [1, 16, 16], 11)   # TYPE_FP32
    assert (outp.name, list(outp.dims), outp.label_filename) == ("logits", [4], "labels.txt")
    with pytest.raises(Exception):   # the checker is strict: a misspelt field fails
        from google.protobuf import text_format
        text_format.Parse('name: "x"\nmax_batch: 3\n', triton_model_config()())
    assert [g["index"] for g in infer_json(home, run["images"][:2])] == predict_torch(run, "teacher")[:2]


def test_an_engine_ships_only_when_it_matches_this_gpu(run, tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    shutil.copytree(run["run_dir"], runs / "deploy-test")
    engines = runs / "deploy-test" / "teacher" / "engines"
    engines.mkdir()
    (engines / "fp16.plan").write_bytes(b"not really an engine")
    (engines / "fp16.plan.json").write_text(json.dumps({"gpu": "NVIDIA H100", "tensorrt": "10.9",
                                                        "compute_capability": "9.0"}))
    # This machine has no TensorRT: the engine stays behind, and the bundle says why.
    out = deploy(run["report"], "teacher", "triton", tmp_path / "a", runs=runs, log=lambda m: None)
    assert parse_config(out / "teacher" / "config.pbtxt").platform == "onnxruntime_onnx"
    note = json.loads((out / "teacher" / "manifest.json").read_text())["engine"]["note"]
    assert "fp16.plan was built for NVIDIA H100" in note
    # On the GPU it was built for, it ships as a tensorrt_plan model.
    monkeypatch.setattr(deploy_mod, "engine_status", lambda plan: (True, "built for NVIDIA H100, TensorRT 10.9"))
    out = deploy(run["report"], "teacher", "triton", tmp_path / "b", runs=runs, log=lambda m: None)
    home = out / "teacher"
    assert parse_config(home / "config.pbtxt").platform == "tensorrt_plan"
    assert (home / "1" / "model.plan").read_bytes() == b"not really an engine"
    m = json.loads((home / "manifest.json").read_text())
    assert m["precision"] == "fp16" and m["engine"]["shipped"] and "1/model.plan" in m["files"]


def test_out_is_refused_unless_forced_and_replaced_whole(run, tmp_path):
    out = tmp_path / "bundle"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    args = ["deploy", str(run["report"]), "--artifact", "teacher-int8", "--target", "onnx", "--out", str(out)]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "not empty; pass --force" in res.stderr
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    res = CliRunner().invoke(app, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert not (out / "keep.txt").exists() and (out / "model.onnx").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["bundle"]     # no temp or old directories left behind


@pytest.mark.parametrize("args,message", [
    (["--artifact", "nope", "--target", "onnx"], "no artifact 'nope'"),
    (["--artifact", "teacher", "--target", "onnx", "--precision", "fp16"], "FP16 is built by TensorRT"),
    (["--artifact", "teacher", "--target", "onnx", "--precision", "int8"], "INT8 needs a quantize stage"),
    (["--artifact", "teacher-int8", "--target", "jetson", "--precision", "fp16"], "deploys as int8 only"),
    (["--artifact", "teacher", "--target", "triton", "--precision", "fp16"], "needs an FP16 TensorRT engine"),
    (["--artifact", "teacher", "--target", "tflite"], "--target 'tflite'"),
    (["--artifact", "teacher", "--target", "onnx", "--runs", "/nonexistent"], "pass --runs DIR"),
])
def test_bad_requests_are_one_line_exit_2(run, tmp_path, args, message):
    res = CliRunner().invoke(app, ["deploy", str(run["report"]), *args, "--out", str(tmp_path / "o")])
    assert res.exit_code == 2, res.output
    lines = [ln for ln in res.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "o").exists()


def test_preprocessing_comes_from_the_stage_manifest(run, tmp_path):
    # Stage manifests carry the preprocessing: a report without `data`, or no report at all, still deploys.
    report = json.loads((run["report"] / "report.json").read_text())
    del report["data"]
    (tmp_path / "rep").mkdir()  # beside the bundle: --out inside a report's directory is refused
    (tmp_path / "rep" / "report.json").write_text(json.dumps(report))
    out = deploy(tmp_path / "rep" / "report.json", "teacher", "onnx", tmp_path / "b", log=lambda m: None)
    m = check_manifest(out, run)
    assert m["source"]["preprocess_from"] == "stage manifest"
    alone = deploy(run["run_dir"], "teacher", "onnx", tmp_path / "c", reports=tmp_path / "elsewhere",
                   log=lambda m: None)
    assert check_manifest(alone, run)["preprocess"] == m["preprocess"]


def test_triton_adds_models_to_a_repository_and_leaves_the_others(run, tmp_path):
    repo = tmp_path / "model_repository"
    (repo / "someone-elses" / "1").mkdir(parents=True)
    (repo / "someone-elses" / "config.pbtxt").write_text('name: "someone-elses"\n')
    (repo / "someone-elses" / "1" / "model.onnx").write_bytes(b"theirs")
    deploy(run["report"], "teacher", "triton", repo, log=lambda m: None)
    deploy(run["report"], "teacher-int8", "triton", repo, log=lambda m: None)
    assert sorted(p.name for p in repo.iterdir()) == ["someone-elses", "teacher", "teacher-int8"]
    assert (repo / "someone-elses" / "1" / "model.onnx").read_bytes() == b"theirs"
    for name in ("teacher", "teacher-int8"):   # both configs hold to Triton's schema
        cfg = parse_config(repo / name / "config.pbtxt")
        assert cfg.name == name and cfg.platform == "onnxruntime_onnx"
    assert (repo / "teacher-int8" / "1" / "model.onnx").read_bytes() == \
        (run["run_dir"] / "teacher-int8" / "model_int8.onnx").read_bytes()
    # the same model again: refused without --force, nothing touched
    args = ["deploy", str(run["report"]), "--artifact", "teacher", "--target", "triton", "--out", str(repo)]
    (repo / "teacher" / "marker").write_text("old")
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "already has a model 'teacher'; pass --force" in res.stderr
    assert (repo / "teacher" / "marker").exists()
    # with --force only that model is replaced
    res = CliRunner().invoke(app, args + ["--force"])
    assert res.exit_code == 0, res.output
    assert not (repo / "teacher" / "marker").exists() and (repo / "teacher" / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in repo.iterdir()) == ["someone-elses", "teacher", "teacher-int8"]
    assert (repo / "someone-elses" / "1" / "model.onnx").read_bytes() == b"theirs"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model_repository"]   # no temp or old dirs left


def _stand_in_tools(tmp_path, gpu="NVIDIA H100"):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "trtexec").write_text("""#!/usr/bin/env bash
if [ "$1" = "--help" ]; then echo "  --stronglyTyped  Create a strongly typed network"; exit 0; fi
for a in "$@"; do case "$a" in --saveEngine=*) echo rebuilt > "${a#--saveEngine=}";;
  --onnx=*) [ -f "${a#--onnx=}" ] || { echo "no ${a#--onnx=}" >&2; exit 1; };; esac; done
""")
    (bin_dir / "nvidia-smi").write_text(f"#!/usr/bin/env bash\necho '{gpu}'\n")
    for f in bin_dir.iterdir():
        f.chmod(0o755)
    return bin_dir


def test_triton_plan_ships_with_its_tensorrt_version_and_a_rebuild_script(run, tmp_path, monkeypatch):
    import os

    runs = tmp_path / "runs"
    shutil.copytree(run["run_dir"], runs / "deploy-test")
    engines = runs / "deploy-test" / "teacher" / "engines"
    engines.mkdir()
    (engines / "fp16.plan").write_bytes(b"not really an engine")
    (engines / "fp16.plan.json").write_text(json.dumps({"gpu": "NVIDIA H100", "tensorrt": "10.9.0.34",
                                                        "compute_capability": "9.0"}))
    monkeypatch.setattr(deploy_mod, "engine_status", lambda plan: (True, "built for NVIDIA H100, TensorRT 10.9"))
    repo = deploy(run["report"], "teacher", "triton", tmp_path / "repo", runs=runs, log=lambda m: None)
    home = repo / "teacher"
    engine = json.loads((home / "engine.json").read_text())
    assert engine["tensorrt"] == "10.9.0.34" and engine["gpu"] == "NVIDIA H100" and engine["precision"] == "fp16"
    assert engine["built_from"] == "model_fp16.onnx" and (home / "model_fp16.onnx").is_file()
    files = json.loads((home / "manifest.json").read_text())["files"]
    assert {"engine.json", "rebuild_engine.sh", "model_fp16.onnx", "1/model.plan"} <= set(files)
    script = home / "rebuild_engine.sh"
    assert os.access(script, os.X_OK)

    env = {**os.environ, "PATH": f"{_stand_in_tools(tmp_path)}:{os.environ['PATH']}"}
    same = subprocess.run(["bash", str(script)], env={**env, "TRT_VERSION": "10.9.0"}, capture_output=True,
                          text=True, timeout=60)
    assert same.returncode == 0 and "nothing to do" in same.stdout
    assert (home / "1" / "model.plan").read_bytes() == b"not really an engine"
    other = subprocess.run(["bash", str(script)], env={**env, "TRT_VERSION": "10.13.3"}, capture_output=True,
                           text=True, timeout=60)
    assert other.returncode == 0, other.stderr
    assert "built with TensorRT 10.9.0.34 on NVIDIA H100, here TensorRT 10.13.3" in other.stdout
    assert (home / "1" / "model.plan").read_text() == "rebuilt\n" and not (home / "1" / "model.plan.tmp").exists()
    rebuilt = json.loads((home / "engine.json").read_text())
    assert rebuilt["tensorrt"] == "10.13.3" and rebuilt["gpu"] == "NVIDIA H100"

    # a plan whose manifest names no TensorRT version does not ship
    (engines / "fp16.plan.json").write_text(json.dumps({"gpu": "NVIDIA H100"}))
    with pytest.raises(deploy_mod.DeployError, match="records no TensorRT version"):
        deploy(run["report"], "teacher", "triton", tmp_path / "repo2", runs=runs, log=lambda m: None)
    assert not (tmp_path / "repo2" / "teacher").exists()


@pytest.mark.parametrize("artifact", ["teacher", "teacher-int8"])
def test_openvino_bundle_ships_ir_and_classifies_like_the_model(run, tmp_path, artifact):
    pytest.importorskip("openvino")
    out = deploy(run["report"], artifact, "openvino", tmp_path / "ov", log=lambda m: None)
    assert {"model.xml", "model.bin", "model.onnx", "infer.py", "manifest.json"} <= {p.name for p in out.iterdir()}
    m = check_manifest(out, run)
    assert m["target"] == "openvino" and m["measured_with"]["runtime"] == "openvino"
    got = infer_json(out, run["images"])
    assert all(g["runtime"].startswith("openvino") for g in got)
    if artifact == "teacher":
        expected = [run["data"].class_names[k] for k in predict_torch(run, "teacher")]
        assert [g["class"] for g in got] == expected
    else:  # the INT8 IR decides like the INT8 ONNX it came from, read by ONNX Runtime
        assert list(m["source"]["files"]) == ["onnx_int8_cpu"]  # the form OpenVINO reads right
        ref = predict_onnx(run, m["source"]["files"]["onnx_int8_cpu"]["path"])
        agree = sum(g["class"] == run["data"].class_names[k] for g, k in zip(got, ref))
        assert agree >= len(ref) - 1  # int8 rounding may flip one near-tie of 16


def test_onnx_bundle_names_the_runtime_version_it_was_measured_with(run, tmp_path):
    out = deploy(run["report"], "teacher-int8", "onnx", tmp_path / "b", log=lambda m: None)
    m = json.loads((out / "manifest.json").read_text())
    report = json.loads((run["report"] / "report.json").read_text())
    assert m["measured_with"] == {"runtime": "onnxruntime", "version": report["machine"]["versions"]["onnxruntime"],
                                  "cpu": report["machine"]["cpu"], "note": None}
