"""How fast does `compress serve` answer? Requests/s and latency at 1, 4 and 16 concurrent clients.

For an FP32 and an INT8 bundle of the same run, the real server (`compress serve`, a
subprocess on 127.0.0.1 and a port the OS picks) is loaded by N client threads, each with its
own keep-alive HTTP connection, POSTing one PNG of the model's input size as raw bytes. Each
level is bounded in requests and in time and starts after a short warm-up; a request counts as
an error unless it answers 200. Reported: requests/s, client-side p50/p99 latency (what a
caller waits, HTTP included), the server's own p50 (`latency_ms.total` in the answers), and the
server's start time (spawn to the first /health answer). The clients run on the same machine as
the server, so on a small CPU they take part of its cores: the numbers are the server and its
load together, named with the machine.

    # the reference: bundles of the committed default pipeline's run (make run first), ~3 min
    python benchmarks/serve.py --run runs/fashion-distill --fp32-artifact mnv2-pruned --int8-artifact mnv2-int8
    python benchmarks/serve.py --fp32 dist/mnv2 --int8 dist/mnv2-int8          # bundles you deployed
    python benchmarks/serve.py --tiny                                            # smoke: a tiny run, ~1 min

Results: benchmarks/results/serve.{json,md} (--tiny writes to a temp directory unless --out).
"""

from __future__ import annotations

import argparse
import http.client
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SERVING = re.compile(r"on http://127\.0\.0\.1:(\d+) ")
TINY_PIPELINE = """\
name: serve-bench-tiny
seed: 0
data:
  dataset: synthetic
  synthetic: {num_train: 256, num_test: 32, num_classes: 4, image_size: 16, channels: 1}
  batch_size: 32
  val_size: 64
stages:
  net:      {type: train, model: resnet8, epochs: 1, lr: 0.05}
  net-int8: {type: quantize, from: net, calibration_size: 32}
export: {parity_images: 8}
benchmark: {runtimes: [onnxruntime], batch_sizes: [1], warmup: 1, iters: 2}
"""


class Server:
    """`compress serve BUNDLE --port 0` in a subprocess; the port is read from its first line."""

    def __init__(self, bundle: Path, workers: int | None):
        t0 = time.perf_counter()
        args = [sys.executable, "-m", "compress", "serve", str(bundle), "--port", "0"]
        self.proc = subprocess.Popen(args + (["--workers", str(workers)] if workers else []), cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        line = self.proc.stderr.readline()
        match = SERVING.search(line)
        if not match:
            self.proc.kill()
            sys.exit(f"error: the server did not start: {line.strip()} {self.proc.stderr.read().strip()[-500:]}")
        self.port = int(match.group(1))
        threading.Thread(target=self.proc.stderr.read, daemon=True).start()   # keep the pipe drained
        self.health = json.loads(self.request("GET", "/health")[1])
        self.start_s = time.perf_counter() - t0

    def request(self, method: str, path: str, body: bytes | None = None) -> tuple[int, bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Content-Type": "image/png"} if body else {})
            r = conn.getresponse()
            return r.status, r.read()
        finally:
            conn.close()

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def payload(health: dict) -> bytes:
    """A PNG of the model's input size and mode (seeded noise: the server decodes and runs it in full)."""
    import numpy as np
    from PIL import Image

    i = health["model"]["input"]
    shape = (i["height"], i["width"]) + ((i["channels"],) if i["channels"] > 1 else ())
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def load(port: int, body: bytes, clients: int, requests: int, seconds: float, warmup: int) -> dict:
    """`clients` threads, each on its own keep-alive connection, until `requests` are sent or `seconds` pass."""
    lock = threading.Lock()
    sent = [0]
    client_ms: list[float] = []
    server_ms: list[float] = []
    errors: list[str] = []
    headers = {"Content-Type": "image/png"}

    def one(conn: http.client.HTTPConnection) -> tuple[int, bytes, float]:
        t0 = time.perf_counter()
        conn.request("POST", "/predict", body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        return r.status, data, (time.perf_counter() - t0) * 1e3

    def worker(start: threading.Barrier, deadline: list[float]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        try:
            for _ in range(warmup):
                one(conn)
        except (OSError, http.client.HTTPException) as exc:
            with lock:
                errors.append(f"warm-up: {exc}")
        finally:
            start.wait()
        while True:
            with lock:
                if sent[0] >= requests or time.perf_counter() > deadline[0]:
                    break
                sent[0] += 1
            try:
                status, data, ms = one(conn)
            except (OSError, http.client.HTTPException) as exc:
                status, data, ms = 0, str(exc).encode(), 0.0
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
            with lock:
                if status == 200:
                    client_ms.append(ms)
                    server_ms.append(json.loads(data)["latency_ms"]["total"])
                else:
                    errors.append(f"{status}: {data[:200]!r}")
        conn.close()

    deadline = [float("inf")]
    start = threading.Barrier(clients + 1)
    threads = [threading.Thread(target=worker, args=(start, deadline)) for _ in range(clients)]
    for t in threads:
        t.start()
    start.wait()   # every client warmed up and connected
    t0 = time.perf_counter()
    deadline[0] = t0 + seconds
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    q = statistics.quantiles(client_ms, n=100, method="inclusive") if len(client_ms) > 1 else [float("nan")] * 99
    return {"clients": clients, "requests": len(client_ms) + len(errors), "errors": len(errors),
            "first_errors": errors[:3], "seconds": round(elapsed, 3),
            "rps": round(len(client_ms) / elapsed, 1) if elapsed else None,
            "p50_ms": round(q[49], 3), "p99_ms": round(q[98], 3),
            "server_p50_ms": round(statistics.median(server_ms), 3) if server_ms else None}


def tiny_bundles(tmp: Path) -> dict[str, Path]:
    """FP32 and INT8 ONNX bundles of a tiny pipeline run (train + quantize on synthetic data)."""
    (tmp / "p.yaml").write_text(TINY_PIPELINE)
    run = [sys.executable, "-m", "compress", "run", str(tmp / "p.yaml"), "--out", str(tmp / "runs"),
           "--reports", str(tmp / "reports"), "--no-progress"]
    proc = subprocess.run(run, cwd=ROOT, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"error: the tiny run failed: {proc.stderr.strip()[-800:]}")
    return deploy_bundles(tmp / "reports" / "serve-bench-tiny", "net", "net-int8", tmp, reports=tmp / "reports")


def deploy_bundles(source: Path, fp32: str, int8: str, tmp: Path, reports: Path | None = None) -> dict[str, Path]:
    out = {}
    for label, artifact in (("fp32", fp32), ("int8", int8)):
        args = [sys.executable, "-m", "compress", "deploy", str(source), "--artifact", artifact, "--target", "onnx",
                "--out", str(tmp / label), "--force", *(["--reports", str(reports)] if reports else [])]
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            sys.exit(f"error: deploy {artifact} failed: {proc.stderr.strip()[-500:]}")
        out[label] = tmp / label
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    lines = [f"# `compress serve` load benchmark ({result['date'][:10]})", "",
             f"Machine: {m['cpu']}, {m['cores']} cores ({m['cores_usable']} usable), no GPU used; "
             f"onnxruntime {m['onnxruntime']}, Python {m['python']}.",
             f"Server: `compress serve --workers {result['workers']}` on 127.0.0.1; clients: threads of the "
             f"benchmark process on the same machine, one keep-alive connection each, POSTing one "
             f"{result['payload_bytes']}-byte PNG as raw bytes. Each level: at most {result['limits']['requests']} "
             f"requests or {result['limits']['seconds']} s after {result['limits']['warmup']} warm-up requests "
             f"per client.", "",
             "| bundle | model | precision | clients | requests | errors | req/s | p50 ms | p99 ms | server p50 ms |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["results"]:
        b = result["bundles"][r["bundle"]]
        lines.append(f"| {b['name']} | {b['model']} | {b['precision']} | {r['clients']} | {r['requests']} | "
                     f"{r['errors']} | {r['rps']:,.1f} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | "
                     f"{r['server_p50_ms']:.2f} |")
    lines += ["", "Server start (spawn to the first /health answer): "
              + ", ".join(f"{b['name']} {b['start_s']:.2f} s" for b in result["bundles"].values()) + ".",
              "p50/p99: what a client waits (HTTP on loopback included); server p50: `latency_ms.total` as the "
              "server reports it (decode, preprocess, queue, inference).", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    src = ap.add_argument_group("bundles (one of)")
    src.add_argument("--fp32", type=Path, help="an FP32 bundle directory (compress deploy --target onnx)")
    src.add_argument("--int8", type=Path, help="an INT8 bundle directory")
    src.add_argument("--run", type=Path, help="a run or report directory to deploy both from")
    src.add_argument("--fp32-artifact", default="mnv2-pruned", help="with --run: the float artifact")
    src.add_argument("--int8-artifact", default="mnv2-int8", help="with --run: the quantized artifact")
    src.add_argument("--tiny", action="store_true", help="smoke test: a tiny synthetic run, few requests")
    ap.add_argument("--clients", default="1,4,16", help="concurrent client counts")
    ap.add_argument("--requests", type=int, default=2000, help="at most this many requests per level")
    ap.add_argument("--seconds", type=float, default=20.0, help="at most this long per level")
    ap.add_argument("--warmup", type=int, default=5, help="untimed requests per client before each level")
    ap.add_argument("--workers", type=int, default=None, help="server --workers (default: the server's)")
    ap.add_argument("--out", type=Path, default=None, help="results directory (default benchmarks/results; "
                                                           "--tiny: a temp directory)")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]
    if args.tiny:
        args.requests, args.seconds, args.warmup = min(args.requests, 200), min(args.seconds, 5.0), 2

    with tempfile.TemporaryDirectory(prefix="serve-bench-") as tmp:
        tmp = Path(tmp)
        if args.tiny:
            print("building a tiny run and its bundles ...", file=sys.stderr)
            bundles = tiny_bundles(tmp)
        elif args.run:
            bundles = deploy_bundles(args.run, args.fp32_artifact, args.int8_artifact, tmp)
        elif args.fp32 and args.int8:
            bundles = {"fp32": args.fp32, "int8": args.int8}
        else:
            ap.error("pass --fp32 and --int8 bundles, --run RUN, or --tiny")
        out = args.out or (Path(tempfile.gettempdir()) / "serve-bench-tiny" if args.tiny
                           else ROOT / "benchmarks" / "results")

        from compress.runtime import machine_info

        info = machine_info()
        result = {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                  "machine": {"cpu": info["cpu"], "cores": info["cores"], "cores_usable": info["cores_usable"],
                              "onnxruntime": info["versions"]["onnxruntime"], "python": info["versions"]["python"]},
                  "limits": {"requests": args.requests, "seconds": args.seconds, "warmup": args.warmup},
                  "tiny": args.tiny, "bundles": {}, "results": []}
        for label, bundle in bundles.items():
            server = Server(bundle, args.workers)
            try:
                model = server.health["model"]
                result["workers"] = server.health["workers"]
                result["bundles"][label] = {"name": model["name"], "model": model["model"], "precision":
                                            model["precision"], "sha256": model["sha256"],
                                            "start_s": round(server.start_s, 3)}
                body = payload(server.health)
                result["payload_bytes"] = len(body)
                for n in clients:
                    row = {"bundle": label, **load(server.port, body, n, args.requests, args.seconds, args.warmup)}
                    result["results"].append(row)
                    print(f"{model['name']:>14} {model['precision']}  {n:>2} clients  {row['requests']:>5} req  "
                          f"{row['errors']} err  {row['rps']:>8,.1f} req/s  p50 {row['p50_ms']:.2f} ms  "
                          f"p99 {row['p99_ms']:.2f} ms", file=sys.stderr)
            finally:
                server.stop()
        out.mkdir(parents=True, exist_ok=True)
        from compress.io import atomic_write_json, atomic_write_text

        atomic_write_json(out / "serve.json", result)
        atomic_write_text(out / "serve.md", markdown(result))
        print(markdown(result))
        print(f"results: {out / 'serve.json'}, {out / 'serve.md'}", file=sys.stderr)


if __name__ == "__main__":
    main()
