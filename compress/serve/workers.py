"""N inference workers: threads, each with its own runtime session, loaded once at start.

The runtime is ONNX Runtime on the bundle's `model.onnx` (every target ships one), or OpenVINO
on an IR `model.xml` where the bundle has one and asks for it. Threads rather than processes:
ONNX Runtime, OpenVINO and Pillow's decoders release the GIL while they
compute, so N threads run N requests at once, start in one process, and share one set of
metrics. Each session runs on `threads` intra-op threads (the cores divided among the workers)
so that N busy workers do not oversubscribe the CPU.
"""

from __future__ import annotations

import importlib.util
import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from compress.serve.bundle import Bundle, BundleError, ImageError


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class _OrtSession:
    """An ONNX Runtime session on the providers the bundle's infer.py would pick."""

    def __init__(self, path: Path, threads: int):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3   # warnings about unused initializers etc. are not the client's business
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
        self.session = ort.InferenceSession(str(path), sess_options=opts,
                                            providers=[p for p in wanted if p in ort.get_available_providers()])
        self.provider = self.session.get_providers()[0]
        inp, out = self.session.get_inputs()[0], self.session.get_outputs()[0]
        self.input, self.input_shape = inp.name, [d if isinstance(d, int) else None for d in inp.shape]
        self.classes = out.shape[-1] if isinstance(out.shape[-1], int) else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        return self.session.run(None, {self.input: x})[0]


class _OpenVinoSession:
    """An OpenVINO model compiled for the CPU with its own infer request; float ops held to f32."""

    def __init__(self, path: Path, threads: int):
        import openvino as ov

        compiled = ov.Core().compile_model(str(path), "CPU", {"INFERENCE_PRECISION_HINT": "f32", "NUM_STREAMS": 1,
                                                              "INFERENCE_NUM_THREADS": threads,
                                                              "PERFORMANCE_HINT": "LATENCY"})
        self.request = compiled.create_infer_request()
        self.provider = "OpenVINO CPU"
        self.input_shape = [d.get_length() if d.is_static else None for d in compiled.input(0).get_partial_shape()]
        last = compiled.output(0).get_partial_shape()[-1]
        self.classes = last.get_length() if last.is_static else None

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.request.infer({0: x})
        return self.request.get_output_tensor(0).data.copy()


RUNTIMES = {"onnxruntime": _OrtSession, "openvino": _OpenVinoSession}


def choose_runtime(bundle: Bundle, asked: str = "auto") -> str:
    """The runtime to serve with: asked for, else OpenVINO for an openvino bundle (where it imports), else
    ONNX Runtime on the bundle's ONNX."""
    from compress import install_hint

    if asked not in ("auto", *RUNTIMES):
        raise BundleError(f"--runtime {asked!r}: expected auto, {', '.join(RUNTIMES)}")
    if asked != "auto":
        if asked not in bundle.models:
            raise BundleError(f"--runtime {asked}: the bundle has no model for it (it has {', '.join(bundle.models)})")
        order = [asked]
    else:
        order = ["openvino", "onnxruntime"] if bundle.target == "openvino" else ["onnxruntime", "openvino"]
        order = [r for r in order if r in bundle.models]
    for runtime in order:
        if importlib.util.find_spec(runtime) is not None:
            return runtime
    extra = "openvino" if order == ["openvino"] else "serve"
    raise BundleError(f"{order[0]} is not installed, and this bundle needs it: {install_hint(extra)}")


class Workers:
    def __init__(self, bundle: Bundle, workers: int, threads: int | None = None, runtime: str = "auto"):
        self.bundle, self.count = bundle, workers
        self.runtime = choose_runtime(bundle, runtime)
        self.model_path, self.model_sha256 = bundle.models[self.runtime]
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = threads or max(1, cores // workers)
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers):
            try:
                session = RUNTIMES[self.runtime](self.model_path, self.threads)
            except Exception as exc:  # noqa: BLE001 (runtimes raise their own exception types for a broken model)
                raise BundleError(f"{self.model_path}: {self.runtime} cannot load it "
                                  f"({' '.join(str(exc).split())[:160]})") from None
            self._sessions.put(session)
        self.provider = session.provider
        shape, classes, pre = session.input_shape, session.classes, bundle.preprocess
        if classes is not None and classes != len(bundle.labels):
            raise BundleError(f"{self.model_path}: the model has {classes} outputs but manifest.json "
                              f"lists {len(bundle.labels)} labels")
        if len(shape) != 4 or any(d is not None and d != want
                                  for d, want in zip(shape[1:], (pre.channels, pre.height, pre.width))):
            raise BundleError(f"{self.model_path}: the model takes {shape}, manifest.json preprocesses to "
                              f"[N, {pre.channels}, {pre.height}, {pre.width}]")
        self.one_at_a_time = shape[0] == 1   # a graph exported with a fixed batch of one
        # Warm up before the first client: every session runs once, and Pillow loads its decoders.
        from PIL import Image

        Image.init()
        zeros = np.zeros((1, pre.channels, pre.height, pre.width), dtype=np.float32)
        try:
            for _ in range(workers):
                self._run(zeros)
        except Exception as exc:  # noqa: BLE001 (whatever the runtime raises, the bundle is not servable)
            raise BundleError(f"{self.model_path}: the model fails on a blank input "
                              f"({' '.join(str(exc).split())[:160]})") from None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="serve-worker")

    def describe(self) -> dict:
        """The model as a client sees it (/health, every prediction)."""
        return {**self.bundle.describe(), "runtime": self.runtime, "file": self.model_path.name,
                "sha256": self.model_sha256}

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        session = self._sessions.get()   # never waits: one session per pool thread
        try:
            if self.one_at_a_time:
                return np.concatenate([session(x[i:i + 1]) for i in range(len(x))])
            return session(x)
        finally:
            self._sessions.put(session)

    def predict(self, images: list[tuple[str | None, bytes]], *, top_k: int, strict: bool,
                max_pixels: int) -> dict:
        """Classify a batch of encoded images (name, bytes); runs in a worker thread."""
        t0 = time.perf_counter()
        xs, notes = [], []
        for i, (name, data) in enumerate(images):
            try:
                x, note = self.bundle.preprocess(data, strict=strict, max_pixels=max_pixels)
            except ImageError as exc:
                if len(images) > 1:
                    label = f"image {i + 1} of {len(images)}" + (f" ({name[:100]})" if name else "")
                    raise ImageError(f"{label}: {exc}", exc.status, exc.reason) from None
                raise
            xs.append(x)
            notes.append({"image": name, **note})
        t1 = time.perf_counter()
        logits = self._run(np.stack(xs))
        t2 = time.perf_counter()
        # softmax exactly as infer.py computes it (float32, max subtracted), so the scores match
        z = logits - logits.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        k = min(top_k, probs.shape[1])
        labels = self.bundle.labels
        predictions = []
        for p, note in zip(probs, notes):
            order = np.argsort(-p, kind="stable")[:k]
            top = [{"index": int(j), "label": labels[j], "score": float(p[j])} for j in order]
            predictions.append({**top[0], "top": top, **note})
        return {"predictions": predictions, "preprocess_ms": (t1 - t0) * 1e3, "inference_ms": (t2 - t1) * 1e3}
