"""`compress serve`: the real server on a free loopback port, spoken to over HTTP.

One tiny pipeline run (a resnet8 on 16x16 synthetic patterns) is deployed as an ONNX bundle;
the server's predictions are held to the bundle's own infer.py, every bad input to its status
code and a JSON body, and 500 requests from 16 concurrent clients must all succeed.
"""

import functools
import io
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compress.cli import app

httpx = pytest.importorskip("httpx")
pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

ROOT = Path(__file__).parents[1]
PIPELINE = """\
name: serve-test
seed: 0
data:
  dataset: synthetic
  synthetic: {num_train: 256, num_test: 16, num_classes: 4, image_size: 16, channels: 1}
  batch_size: 32
  val_size: 64
stages:
  net: {type: train, model: resnet8, epochs: 3, lr: 0.05}
export: {parity_images: 4}
benchmark: {runtimes: [onnxruntime], batch_sizes: [1], warmup: 0, iters: 1}
"""
SERVING = re.compile(r"on (http://127\.0\.0\.1:\d+) ")


def png(array: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A deploy bundle from a real (tiny) run, and test images as PNG files."""
    from compress import config
    from compress.data import synthetic
    from compress.deploy import deploy
    from compress.pipeline import run_pipeline

    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "p.yaml").write_text(PIPELINE)
    cfg = config.load(tmp / "p.yaml", [f"report.dir={tmp / 'reports'}"])
    report = run_pipeline(cfg, pipeline_path=tmp / "p.yaml", runs_dir=tmp / "runs", log=lambda m: None,
                          progress=False)
    out = deploy(report, "net", "onnx", tmp / "bundle", log=lambda m: None)
    images = []
    for i, x in enumerate(synthetic.load(cfg.data, lambda m: None).test_x[:16]):
        images.append(tmp / f"img{i}.png")
        images[-1].write_bytes(png(x[0]))
    rgb = tmp / "rgb.png"   # another size and channel count: converted and resized as infer.py does
    rgb.write_bytes(png(np.random.default_rng(0).integers(0, 256, (30, 20, 3), dtype=np.uint8)))
    return {"dir": out, "images": images, "rgb": rgb, "tmp": tmp, "report": report,
            "manifest": json.loads((out / "manifest.json").read_text())}


class Server:
    """`compress serve` in a subprocess on a port the OS picked; stopped with SIGTERM."""

    def __init__(self, bundle_dir: Path, *args: str):
        started = time.perf_counter()
        self.proc = subprocess.Popen([sys.executable, "-m", "compress", "serve", str(bundle_dir), "--port", "0", *args],
                                     cwd=ROOT, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
        first = self.proc.stderr.readline()   # the "serving ... on http://127.0.0.1:PORT" line
        match = SERVING.search(first)
        if not match:
            self.proc.kill()
            raise AssertionError(f"server did not start: {first}{self.proc.stderr.read()}")
        self.url = match.group(1)
        self.log: list[str] = []
        threading.Thread(target=lambda: self.log.extend(self.proc.stderr), daemon=True).start()
        self.client = httpx.Client(base_url=self.url, timeout=30)
        assert self.client.get("/health").status_code == 200
        self.start_s = time.perf_counter() - started
        self.start_cpu_s = cpu_seconds(self.proc.pid)

    def stop(self) -> int:
        self.client.close()
        self.proc.terminate()
        return self.proc.wait(timeout=15)


@pytest.fixture(scope="module")
def server(bundle):
    srv = Server(bundle["dir"], "--workers", "2", "--max-upload-mb", "0.25", "--max-batch", "8")
    yield srv
    assert srv.stop() == 0   # a graceful stop on SIGTERM
    assert not any("Traceback" in line for line in srv.log), "".join(srv.log)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process so far (Linux), the work it did whatever else the machine ran."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def infer_py(bundle, images):
    proc = subprocess.run([sys.executable, "infer.py", *map(str, images), "--json"], cwd=bundle["dir"], check=False,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def metric(text: str, name: str, **labels) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(f"{name}{{{want}}} ") or (not labels and line.startswith(f"{name} ")):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_predictions_equal_infer_py(bundle, server):
    images = [*bundle["images"], bundle["rgb"]]
    expected = infer_py(bundle, images)
    assert len({e["index"] for e in expected}) > 1   # a model that always says one class would match anything
    model_sha = bundle["manifest"]["files"]["model.onnx"]
    for path, want in zip(images, expected):   # raw bytes, one image a request
        r = server.client.post("/predict", content=path.read_bytes(), headers={"Content-Type": "image/png"})
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model"]["name"] == "net" and body["model"]["sha256"] == model_sha
        assert body["latency_ms"]["total"] >= body["latency_ms"]["inference"] > 0
        (p,) = body["predictions"]
        assert (p["index"], p["label"]) == (want["index"], want["class"])
        assert p["score"] == pytest.approx(want["probability"], abs=1e-6)
        scores = [t["score"] for t in p["top"]]
        assert len(scores) == 4 and scores == sorted(scores, reverse=True) and sum(scores) == pytest.approx(1, abs=1e-5)
    assert p["converted"] == "RGB->L" and p["resized"] == "20x30->16x16"
    # A batch in one multipart request answers in order, with the file names.
    files = [("image", (p.name, p.read_bytes(), "image/png")) for p in images[:8]]
    r = server.client.post("/predict", files=files, params={"top_k": 2})
    assert r.status_code == 200, r.text
    got = r.json()["predictions"]
    assert [(g["image"], g["index"]) for g in got] == [(p.name, e["index"]) for p, e in zip(images, expected[:8])]
    assert all(len(g["top"]) == 2 for g in got)


def test_resize_and_centre_crop_as_the_manifest_says(bundle, tmp_path):
    # A manifest with `resize` (data.resize: torchvision Resize + CenterCrop) is served as infer.py reads it.
    copy = tmp_path / "b"
    shutil.copytree(bundle["dir"], copy)
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["preprocess"].update(resize=22, resize_mode="shorter_side_center_crop")
    (copy / "manifest.json").write_text(json.dumps(manifest))
    wide = tmp_path / "wide.png"
    wide.write_bytes(png(np.random.default_rng(1).integers(0, 256, (19, 41), dtype=np.uint8)))
    images = [wide, bundle["rgb"], *bundle["images"][:4]]
    expected = infer_py({"dir": copy}, images)
    srv = Server(copy, "--workers", "1")
    try:
        for path, want in zip(images, expected):
            (p,) = srv.client.post("/predict", content=path.read_bytes()).json()["predictions"]
            assert (p["index"], p["score"]) == (want["index"], pytest.approx(want["probability"], abs=1e-6))
        assert p["resized"] == "16x16->shorter side 22, centre 16x16"
        manifest["preprocess"]["resize_mode"] = "stretch"
        (copy / "manifest.json").write_text(json.dumps(manifest))
    finally:
        assert srv.stop() == 0
    res = CliRunner().invoke(app, ["serve", str(copy), "--port", "0"])
    assert res.exit_code == 2 and "resize_mode 'stretch' is not one this server knows" in res.stderr


def test_a_triton_repository_and_an_openvino_ir_bundle(bundle, tmp_path):
    from compress.deploy import deploy
    from compress.io import sha256_file

    images = bundle["images"][:6]
    expected = infer_py(bundle, images)
    # A Triton model repository holding one model: served from the repository's root.
    repo = deploy(bundle["report"], "net", "triton", tmp_path / "repo", log=lambda m: None)
    srv = Server(repo, "--workers", "1")
    try:
        for path, want in zip(images, expected):
            body = srv.client.post("/predict", content=path.read_bytes()).json()
            assert body["predictions"][0]["index"] == want["index"]
        assert body["model"]["target"] == "triton" and body["model"]["file"] == "model.onnx"
    finally:
        assert srv.stop() == 0
    # An OpenVINO IR beside the ONNX, in a bundle whose target is openvino: OpenVINO serves it.
    ov = pytest.importorskip("openvino")
    copy = tmp_path / "ov"
    shutil.copytree(bundle["dir"], copy)
    ov.save_model(ov.convert_model(str(copy / "model.onnx")), str(copy / "model.xml"))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["target"] = "openvino"
    manifest["files"].update({n: sha256_file(copy / n) for n in ("model.xml", "model.bin")})
    (copy / "manifest.json").write_text(json.dumps(manifest))
    srv = Server(copy, "--workers", "2")
    try:
        health = srv.client.get("/health").json()
        assert (health["model"]["runtime"], health["model"]["file"]) == ("openvino", "model.xml")
        assert health["model"]["sha256"] == manifest["files"]["model.xml"]
        for path, want in zip(images, expected):
            (p,) = srv.client.post("/predict", content=path.read_bytes()).json()["predictions"]
            # another runtime than infer.py's ONNX Runtime: its float rounding differs in the 5th decimal
            assert (p["index"], p["score"]) == (want["index"], pytest.approx(want["probability"], abs=1e-4))
    finally:
        assert srv.stop() == 0


def test_a_failure_inside_the_server_is_a_bare_json_500(bundle, monkeypatch):
    import asyncio

    from compress.serve import load_bundle
    from compress.serve.app import create_app
    from compress.serve.workers import Workers

    workers = Workers(load_bundle(bundle["dir"]), 1)

    def broken(*args, **kwargs):
        raise RuntimeError("secret internal detail")

    async def ask():
        transport = httpx.ASGITransport(app=create_app(workers), raise_app_exceptions=False)
        async with httpx.AsyncClient(transport=transport, base_url="http://serve") as client:
            return (await client.post("/predict", content=bundle["images"][0].read_bytes()),
                    (await client.get("/metrics")).text)

    monkeypatch.setattr(workers, "predict", broken)
    try:
        r, metrics = asyncio.run(ask())
    finally:
        workers.close()
    assert r.status_code == 500 and r.json()["reason"] == "internal"
    assert "secret" not in r.text and "Traceback" not in r.text
    assert metric(metrics, "compress_serve_requests_total", endpoint="/predict", code="500") == 1


@functools.cache
def big_png() -> bytes:
    return png(np.zeros((4200, 4200), dtype=np.uint8))   # 17.6 Mpixel, a few kB compressed


@pytest.mark.parametrize("name,request_kwargs,status,reason", [
    ("not an image", {"content": b"hello, not an image", "headers": {"Content-Type": "image/png"}}, 400, "not_an_image"),
    ("truncated PNG", {"content": "TRUNCATED", "headers": {"Content-Type": "image/png"}}, 400, "not_an_image"),
    ("empty body", {"content": b"", "headers": {"Content-Type": "application/octet-stream"}}, 400, "missing_field"),
    ("JSON body", {"json": {"image": "x.png"}}, 415, "unsupported_media_type"),
    ("broken multipart", {"content": b"--x\r\nnot really", "headers": {"Content-Type": "multipart/form-data; boundary=x"}},
     400, "bad_multipart"),
    ("form without the field", {"files": {"picture": ("a.png", "IMAGE", "image/png")}}, 400, "missing_field"),
    ("field as text", {"data": {"image": "not a file"}, "files": {"other": ("a", b"x")}}, 400, "missing_field"),
    ("oversized upload", {"content": b"\0" * 300_000, "headers": {"Content-Type": "image/png"}}, 413, "too_large"),
    ("oversized, chunked", {"content": iter([b"\0" * 100_000] * 3)}, 413, "too_large"),
    ("too many images", {"files": [("image", ("a.png", "IMAGE", "image/png"))] * 9}, 413, "too_many_images"),
    ("too many pixels", {"content": "BIG", "headers": {"Content-Type": "image/png"}}, 413, "image_too_large"),
    ("bad top_k", {"content": "IMAGE", "params": {"top_k": "-1"}}, 400, "bad_parameter"),
    ("one bad image in a batch", {"files": [("image", ("a.png", "IMAGE", "image/png")),
                                            ("image", ("b.txt", b"text", "text/plain"))]}, 400, "not_an_image"),
])
def test_bad_input_gets_its_status_and_a_json_reason(bundle, server, name, request_kwargs, status, reason):
    good = bundle["images"][0].read_bytes()
    swap = {"IMAGE": lambda: good, "TRUNCATED": lambda: good[: len(good) // 2], "BIG": big_png}

    def sub(v):
        if isinstance(v, str) and v in swap:
            return swap[v]()
        if isinstance(v, tuple):
            return tuple(sub(x) for x in v)
        if isinstance(v, list):
            return [sub(x) for x in v]
        if isinstance(v, dict):
            return {k: sub(x) for k, x in v.items()}
        return v

    before = server.client.get("/metrics").text
    r = server.client.post("/predict", **sub(request_kwargs))
    assert r.status_code == status, r.text
    body = r.json()
    assert body["reason"] == reason and body["error"] and "Traceback" not in r.text
    if name == "one bad image in a batch":
        assert body["error"].startswith("image 2 of 2 (b.txt): ")
    after = server.client.get("/metrics").text
    assert metric(after, "compress_serve_errors_total", endpoint="/predict", reason=reason) == \
        metric(before, "compress_serve_errors_total", endpoint="/predict", reason=reason) + 1
    assert server.client.get("/health").json()["status"] == "ok"   # still serving


def test_other_routes_answer_json_errors(server):
    r = server.client.get("/predict")
    assert r.status_code == 405 and r.json()["reason"] == "method_not_allowed"
    r = server.client.get("/no/such/page")
    assert r.status_code == 404 and r.json()["reason"] == "not_found"


def test_health_metrics_and_page(bundle, server):
    health = server.client.get("/health").json()
    assert health["model"]["sha256"] == bundle["manifest"]["files"]["model.onnx"]
    assert health["labels"] == bundle["manifest"]["labels"] and health["workers"] == 2
    assert health["model"]["input"] == {"channels": 1, "height": 16, "width": 16, "mode": "L", "resize": None}
    before = server.client.get("/metrics").text
    for _ in range(3):
        assert server.client.post("/predict", content=bundle["images"][1].read_bytes()).status_code == 200
    r = server.client.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = r.text
    for name, labels in [("compress_serve_requests_total", {"endpoint": "/predict", "code": "200"}),
                         ("compress_serve_request_duration_seconds_count", {"endpoint": "/predict"}),
                         ("compress_serve_images_total", {}), ("compress_serve_inference_seconds_count", {})]:
        assert metric(after, name, **labels) - metric(before, name, **labels) == 3, name
    assert 'compress_serve_model_info{name="net"' in after
    page = server.client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert 'type="file"' in page.text and "predict" in page.text
    assert not re.search(r"https?://", page.text), "the page must not load anything from elsewhere"


def test_500_requests_from_16_clients(bundle, server):
    images = bundle["images"]
    expected = {p.name: None for p in images}
    for p in images:   # each image's answer, asked once alone
        expected[p.name] = server.client.post("/predict", content=p.read_bytes()).json()["predictions"][0]["index"]
    before = server.client.get("/metrics").text
    data = [p.read_bytes() for p in images]

    def client(k):
        results = []
        with httpx.Client(base_url=server.url, timeout=60) as c:
            for i in range(k, 500, 16):
                r = c.post("/predict", content=data[i % len(data)], headers={"Content-Type": "image/png"})
                results.append((i, r.status_code, r.json()["predictions"][0]["index"] if r.status_code == 200 else r.text))
        return results

    with ThreadPoolExecutor(16) as pool:
        results = [r for rs in pool.map(client, range(16)) for r in rs]
    assert len(results) == 500
    assert [r for r in results if r[1] != 200] == []
    assert all(index == expected[images[i % len(images)].name] for i, _, index in results)
    after = server.client.get("/metrics").text
    assert metric(after, "compress_serve_requests_total", endpoint="/predict", code="200") - \
        metric(before, "compress_serve_requests_total", endpoint="/predict", code="200") == 500


def test_strict_refuses_other_shapes_and_starts_fast(bundle):
    srv = Server(bundle["dir"], "--strict", "--workers", "1")
    try:
        # Start-up (interpreter, imports, hashing, session, warm-up) costs under 5 s of CPU; the wall time
        # is that on an idle machine (benchmarks/serve.py records it), more on a busy one.
        if srv.start_cpu_s is not None:
            assert srv.start_cpu_s < 5, f"start-up took {srv.start_cpu_s:.1f} s of CPU ({srv.start_s:.1f} s wall)"
        r = srv.client.post("/predict", content=bundle["rgb"].read_bytes())
        assert r.status_code == 422 and r.json()["reason"] == "wrong_shape"
        assert "expected a 16x16 L image" in r.json()["error"] and "got 20x30 RGB" in r.json()["error"]
        assert srv.client.post("/predict", content=bundle["images"][0].read_bytes()).status_code == 200
    finally:
        assert srv.stop() == 0


def _tamper(kind, root: Path) -> Path:
    manifest = json.loads((root / "manifest.json").read_text())
    if kind == "model changed":
        with open(root / "model.onnx", "ab") as f:
            f.write(b"\0")
    elif kind == "file missing":
        (root / "labels.txt").unlink()
    elif kind == "no manifest":
        (root / "manifest.json").unlink()
    elif kind == "manifest not JSON":
        (root / "manifest.json").write_text("{not json")
    elif kind == "entry outside the bundle":
        manifest["files"]["../escape.txt"] = "0" * 64
        (root / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "bad preprocess":
        manifest["preprocess"]["std"] = [0]
        (root / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "labels do not match the model":
        manifest["labels"] = manifest["labels"][:2]
        (root / "manifest.json").write_text(json.dumps(manifest))
    elif kind == "not a directory":
        return root / "model.onnx"
    elif kind == "no such path":
        return root / "nope"
    return root


@pytest.mark.parametrize("kind,message", [
    ("model changed", "model.onnx: sha256 differs from manifest.json"),
    ("file missing", "incomplete bundle, labels.txt is missing"),
    ("no manifest", "not a deploy bundle (no manifest.json)"),
    ("manifest not JSON", "manifest.json: unreadable"),
    ("entry outside the bundle", "points outside the bundle"),
    ("bad preprocess", "mean and std must be 1 finite numbers each (std > 0)"),
    ("labels do not match the model", "the model has 4 outputs but manifest.json lists 2 labels"),
    ("not a directory", "not a directory"),
    ("no such path", "no such bundle directory"),
])
def test_a_bad_bundle_is_refused_at_start(bundle, tmp_path, kind, message):
    copy = tmp_path / "b"
    shutil.copytree(bundle["dir"], copy)
    res = CliRunner().invoke(app, ["serve", str(_tamper(kind, copy)), "--port", "0"])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], res.stderr


@pytest.mark.parametrize("args,message", [
    (["--workers", "0"], "--workers 0: expected 1 to 256"),
    (["--max-upload-mb", "0"], "--max-upload-mb 0: expected more than 0"),
    (["--port", "70000"], "--port 70000"),
    (["--host", "no.such.host.invalid"], "cannot resolve"),
    (["--port", "BUSY"], "cannot listen on 127.0.0.1:"),
])
def test_bad_options_are_one_line_exit_2(bundle, args, message):
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        args = [str(busy.getsockname()[1]) if a == "BUSY" else a for a in args]
        res = CliRunner().invoke(app, ["serve", str(bundle["dir"]), *args])
    assert res.exit_code == 2, res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
