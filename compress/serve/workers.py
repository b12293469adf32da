"""N inference workers: threads, each with its own ONNX Runtime session, loaded once at start.

Threads rather than processes: ONNX Runtime and Pillow's decoders release the GIL while they
compute, so N threads run N requests at once, start in one process, and share one set of
metrics. Each session runs on `threads` intra-op threads (the cores divided among the workers)
so that N busy workers do not oversubscribe the CPU.
"""

from __future__ import annotations

import os
import queue
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from compress.serve.bundle import Bundle, BundleError, ImageError


def default_workers() -> int:
    return max(1, min(8, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


class Workers:
    def __init__(self, bundle: Bundle, workers: int, threads: int | None = None):
        import onnxruntime as ort

        self.bundle, self.count = bundle, workers
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
        self.threads = threads or max(1, cores // workers)
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.log_severity_level = 3   # warnings about unused initializers etc. are not the client's business
        wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")   # as the bundle's infer.py chooses
        providers = [p for p in wanted if p in ort.get_available_providers()]
        self._sessions: queue.SimpleQueue = queue.SimpleQueue()
        for _ in range(workers):
            try:
                session = ort.InferenceSession(str(bundle.model_path), sess_options=opts, providers=providers)
            except Exception as exc:  # noqa: BLE001 (ORT raises its own exception types for a broken model)
                raise BundleError(f"{bundle.model_path}: ONNX Runtime cannot load it "
                                  f"({' '.join(str(exc).split())[:160]})") from None
            self._sessions.put(session)
        self.provider = session.get_providers()[0]
        self._input = session.get_inputs()[0].name
        shape, classes = session.get_inputs()[0].shape, session.get_outputs()[0].shape[-1]
        pre = bundle.preprocess
        if isinstance(classes, int) and classes != len(bundle.labels):
            raise BundleError(f"{bundle.model_path}: the model has {classes} outputs but manifest.json "
                              f"lists {len(bundle.labels)} labels")
        if len(shape) != 4 or any(isinstance(d, int) and d != want
                                  for d, want in zip(shape[1:], (pre.channels, pre.height, pre.width))):
            raise BundleError(f"{bundle.model_path}: the model takes {shape}, manifest.json preprocesses to "
                              f"[N, {pre.channels}, {pre.height}, {pre.width}]")
        self.one_at_a_time = shape[0] == 1   # a graph exported with a fixed batch of one
        # Warm up before the first client: every session runs once, and Pillow loads its decoders.
        from PIL import Image

        Image.init()
        zeros = np.zeros((1, pre.channels, pre.height, pre.width), dtype=np.float32)
        try:
            for _ in range(workers):
                self._run(zeros)
        except Exception as exc:  # noqa: BLE001 (whatever ORT raises, the bundle is not servable)
            raise BundleError(f"{bundle.model_path}: the model fails on a blank input "
                              f"({' '.join(str(exc).split())[:160]})") from None
        self.pool = ThreadPoolExecutor(workers, thread_name_prefix="serve-worker")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def _run(self, x: np.ndarray) -> np.ndarray:
        session = self._sessions.get()   # never waits: one session per pool thread
        try:
            if self.one_at_a_time:
                return np.concatenate([session.run(None, {self._input: x[i:i + 1]})[0] for i in range(len(x))])
            return session.run(None, {self._input: x})[0]
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
                    label = f"image {i + 1} of {len(images)}" + (f" ({name})" if name else "")
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
