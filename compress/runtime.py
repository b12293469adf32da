"""Runners, accuracy and honest latency: one model on one runtime behind one call.

A runner wraps one model on one runtime (PyTorch, ONNX Runtime, TensorRT) behind the same
call: a float image batch in, logits out. Latency follows the usual rules for numbers one
can trust: warm up first, time each iteration separately, report percentiles rather than a
best case, and on a GPU time the device work with CUDA events on the stream the work runs on
(a host clock would time only the kernel launches). Each result says which timer it used and
whether host<->device copies are inside the timed region.

Shared by the benchmark stage (every artifact on every runtime), the prune stage (a latency
target) and the benchmarks/ scripts (machine_info).
"""

from __future__ import annotations

import copy
import importlib.metadata
import os
import platform
import time
from pathlib import Path
from typing import Any, Iterable, Protocol

import numpy as np
import torch
from torch import nn

RUNTIMES = ("torch", "onnxruntime", "openvino", "tensorrt")
# Which artifact file each ONNX Runtime precision reads (fp16 is engine.fp16_onnx's output). For
# int8 the CPU form (uint8 activations, int32 biases: what ONNX Runtime's CPU kernels fuse) comes
# first when the quantize stage wrote one; the TensorRT QDQ file (`onnx_int8`) otherwise.
ONNX_FILES = {"fp32": "onnx", "fp16": "onnx_fp16", "int8": "onnx_int8"}
CPU_INT8_FILES = {"onnxruntime": ("onnx_int8_cpu", "onnx_int8"),
                  # OpenVINO 2026.4 misreads the TensorRT QDQ file's quantized Gemm (signed activations, float
                  # bias): a tiny trained net fell from 100% to 66% top-1 (100% with that Gemm float) where
                  # ONNX Runtime kept 100%; the uint8 form reads right (tests/test_cpu_runtimes.py).
                  "openvino": ("openvino_int8", "onnx_int8_cpu", "onnx_int8")}


class Runner(Protocol):
    runtime: str                 # "torch", "onnxruntime", "tensorrt"
    precision: str               # "fp32", "fp16", "int8"
    device: str                  # what it runs on, for the report: "cpu (2 threads)", a GPU name
    threads: int | None          # CPU threads doing the math (None on a GPU)
    input_device: torch.device   # where __call__ wants its input; latency puts the batch there first
    cuda_stream: bool            # work is queued on torch's current CUDA stream (timed with CUDA events)
    includes_copies: bool        # host<->device copies happen inside __call__ (and so inside the timing)

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...
    def sync(self) -> None: ...


def _cpu_device(threads: int) -> str:
    return f"cpu ({threads} thread{'s' if threads != 1 else ''})"


class TorchRunner:
    """An ``nn.Module`` in eval mode under ``torch.inference_mode``; fp16 on CUDA only."""

    runtime = "torch"
    includes_copies = False
    fast_path = None   # a compress.fastpath.FastPath (CPU: channels-last, bf16 autocast); see use()

    def __init__(self, model: nn.Module, precision: str = "fp32", device: str | torch.device = "cpu"):
        self.input_device = torch.device(device)
        self.cuda_stream = self.input_device.type == "cuda"
        if precision not in ("fp32", "fp16"):
            raise ValueError(f"the torch runner runs fp32 or fp16 models, not {precision!r} "
                             "(int8 models run on onnxruntime or tensorrt)")
        if precision == "fp16" and not self.cuda_stream:
            raise ValueError("fp16 torch inference needs a CUDA device")
        self.precision = precision
        self._dtype = torch.float16 if precision == "fp16" else torch.float32
        if precision == "fp16":  # .half() works in place: leave the caller's fp32 model alone
            model = copy.deepcopy(model)
        self.model = model.eval().to(device=self.input_device, dtype=self._dtype)

    @property
    def threads(self) -> int | None:
        return None if self.cuda_stream else torch.get_num_threads()

    @property
    def device(self) -> str:
        if self.cuda_stream:
            return torch.cuda.get_device_name(self.input_device)
        return _cpu_device(torch.get_num_threads())

    def use(self, fast_path) -> None:
        """Run through a compress.fastpath.FastPath: the model's memory format now, autocast per call."""
        self.fast_path = fast_path
        fast_path.model(self.model)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            x = x.to(self.input_device, self._dtype, non_blocking=True)
            if self.fast_path is None:
                out = self.model(x)
            else:
                with self.fast_path.context():
                    out = self.model(self.fast_path.input(x))
        return out.float()

    def sync(self) -> None:
        if self.cuda_stream:
            torch.cuda.synchronize(self.input_device)


class OrtRunner:
    """An ``onnxruntime.InferenceSession``: CPU, or the CUDA provider when asked for and present.

    ONNX Runtime takes and returns host arrays, so on CUDA the copies are part of every call
    (``includes_copies``). The device reported is the provider ONNX Runtime actually chose.
    """

    runtime = "onnxruntime"
    cuda_stream = False  # ONNX Runtime uses its own stream; its run() returns when outputs are on the host
    input_device = torch.device("cpu")

    def __init__(self, onnx_path: str | os.PathLike, precision: str = "fp32", device: str | torch.device = "cpu",
                 threads: int | None = None):
        import onnxruntime as ort

        device = torch.device(device)
        self.precision = precision
        self.threads = threads or torch.get_num_threads()
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        providers: list = ["CPUExecutionProvider"]
        if device.type == "cuda" and "CUDAExecutionProvider" in ort.get_available_providers():
            providers.insert(0, ("CUDAExecutionProvider", {"device_id": device.index or 0}))
        self.session = ort.InferenceSession(str(onnx_path), sess_options=opts, providers=providers)
        self.providers = self.session.get_providers()
        on_gpu = self.providers[0] == "CUDAExecutionProvider"
        self.includes_copies = on_gpu
        self.device = torch.cuda.get_device_name(device.index or 0) if on_gpu else _cpu_device(self.threads)
        if on_gpu:
            self.threads = None
        self._input = self.session.get_inputs()[0].name
        self._output = self.session.get_outputs()[0].name

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        return torch.from_numpy(self.session.run([self._output], {self._input: arr})[0])

    def sync(self) -> None:
        pass  # run() is synchronous


class OpenVinoRunner:
    """An OpenVINO CPU model (ONNX or IR ``.xml``), compiled once per batch size it is called with.

    FP32 means FP32: on CPUs with AMX or AVX-512 BF16 OpenVINO would otherwise pick bf16 for the
    float parts (``INFERENCE_PRECISION_HINT``), so it is set to f32 and the value the compiled
    model reports is kept in ``inference_precision``. Quantized (INT8) layers still run in int8
    under that hint; only the float ops are held to f32. Batches are static per compile (OpenVINO
    plans memory and kernels for a known shape); a few sizes are cached, others run the dynamic model.
    """

    runtime = "openvino"
    cuda_stream = False
    includes_copies = False
    input_device = torch.device("cpu")
    MAX_STATIC = 6

    def __init__(self, path: str | os.PathLike, precision: str = "fp32", threads: int | None = None):
        import openvino as ov

        self.precision = precision
        self.file = str(path)
        self.threads = threads or torch.get_num_threads()
        self.device = _cpu_device(self.threads)
        self._core = ov.Core()
        self._model = self._core.read_model(str(path))
        self._config = {"INFERENCE_PRECISION_HINT": "f32", "INFERENCE_NUM_THREADS": self.threads,
                        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"}
        self._compiled: dict[int | None, Any] = {}
        hint = self._compile(None)[0].get_property("INFERENCE_PRECISION_HINT")
        self.inference_precision = hint.get_type_name() if hasattr(hint, "get_type_name") else str(hint)  # "f32"

    def _compile(self, batch: int | None):
        if batch not in self._compiled:
            model = self._model
            if batch is not None:
                model = model.clone()
                shape = model.input(0).get_partial_shape()
                shape[0] = batch
                model.reshape({0: shape})
            compiled = self._core.compile_model(model, "CPU", self._config)
            self._compiled[batch] = (compiled, compiled.create_infer_request())
        return self._compiled[batch]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        b = int(arr.shape[0])
        static = b in self._compiled or len(self._compiled) <= self.MAX_STATIC
        _, request = self._compile(b if static else None)
        request.infer({0: arr})
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    def sync(self) -> None:
        pass  # infer() is synchronous


def openvino_version() -> str | None:
    return _version("openvino")


def require_runtimes(runtimes: Iterable[str]) -> None:
    """Fail before any stage when the YAML asks for an optional CPU runtime that is not installed.

    TensorRT is not checked: without a GPU its rows are reported as skipped, by design. OpenVINO
    runs on any x86/ARM CPU, so asking for it without the package is a mistake to report at once.
    """
    import importlib.util

    from compress.config import ConfigError

    if "openvino" in runtimes and importlib.util.find_spec("openvino") is None:
        raise ConfigError("benchmark.runtimes: openvino needs the 'openvino' package, which is not installed; "
                          "install it with pip install 'compress-vision[openvino]' (in this checkout: "
                          "pip install -e '.[openvino]'), or remove openvino from benchmark.runtimes")


def make_runner(runtime: str, artifact_files: dict[str, str], precision: str = "fp32",
                device: str | torch.device = "cpu", *, model: nn.Module | None = None,
                threads: int | None = None) -> Runner:
    """The runner for one artifact on one runtime.

    runtime         "torch", "onnxruntime", "openvino" (CPU) or "tensorrt"
    artifact_files  an ``Artifact.files`` dict; the file used is picked by runtime and precision:
                    torch -> ``model`` (only when no ``model=`` is given), onnxruntime ->
                    ``onnx`` / ``onnx_fp16`` / ``onnx_int8_cpu`` or ``onnx_int8``, openvino ->
                    ``onnx`` / ``openvino_int8`` (IR) or an int8 ONNX, tensorrt -> ``engine_<precision>``
    precision       "fp32", "fp16" or "int8"
    device          "cpu" or "cuda[:i]"; tensorrt needs cuda
    model           torch only: the already-built module (the caller loads it through the registry)
    threads         CPU threads for onnxruntime (default ``torch.get_num_threads()``); torch
                    uses the process-wide ``torch.set_num_threads``, which the caller sets
    """
    if runtime == "torch":
        if model is None:
            if "model" not in artifact_files:
                raise ValueError("the torch runner needs model= or a 'model' file in the artifact")
            from compress.io import load_model
            model = load_model(artifact_files["model"])
        return TorchRunner(model, precision, device)
    if runtime == "onnxruntime":
        key = ONNX_FILES.get(precision)
        if key is None:
            raise ValueError(f"unknown precision {precision!r}; expected one of {', '.join(ONNX_FILES)}")
        if precision == "int8":
            key = next((k for k in CPU_INT8_FILES["onnxruntime"] if k in artifact_files), key)
        if key not in artifact_files:
            raise ValueError(f"no {key!r} file for an {precision} onnxruntime run (artifact has {sorted(artifact_files)})")
        runner = OrtRunner(artifact_files[key], precision, device, threads)
        runner.file = artifact_files[key]
        return runner
    if runtime == "openvino":
        keys = CPU_INT8_FILES["openvino"] if precision == "int8" else ("onnx",) if precision == "fp32" else ()
        if not keys:
            raise ValueError(f"the openvino runner runs fp32 or int8 models, not {precision!r}")
        key = next((k for k in keys if k in artifact_files), None)
        if key is None:
            raise ValueError(f"no {' / '.join(keys)} file for an {precision} openvino run "
                             f"(artifact has {sorted(artifact_files)})")
        return OpenVinoRunner(artifact_files[key], precision, threads)
    if runtime == "tensorrt":
        key = f"engine_{precision}"
        if key not in artifact_files:
            raise ValueError(f"no {key!r} engine in the artifact (it has {sorted(artifact_files)})")
        # The engine stage owns the TensorRT runtime code; imported here so that it loads lazily.
        from compress.trt import TrtRunner
        runner = TrtRunner(Path(artifact_files[key]), device)
        if runner.precision != precision:
            raise ValueError(f"{artifact_files[key]} is a {runner.precision} engine, not {precision}")
        return runner
    raise ValueError(f"unknown runtime {runtime!r}; expected one of {', '.join(RUNTIMES)}")


# ----------------------------------------------------------------------------- measuring

def measure_latency(runner: Runner, batch: torch.Tensor, warmup: int = 10, iters: int = 50,
                    min_time_s: float = 0.0, keep_times: bool = False) -> dict[str, Any]:
    """Per-iteration latency of ``runner(batch)`` in milliseconds, after ``warmup`` untimed calls.

    Runs ``iters`` timed calls, more if they add up to less than ``min_time_s``. GPU work on
    torch's stream is timed with CUDA events around each call (the device time, including any
    gaps while the host is still launching); everything else with ``perf_counter_ns`` around a
    call followed by ``sync()``. Throughput is images per second at the mean latency.
    """
    if iters < 1:
        raise ValueError("iters must be >= 1")
    x = batch.to(runner.input_device)
    b = int(x.shape[0])
    for _ in range(warmup):
        runner(x)
    runner.sync()

    times: list[float] = []
    budget_ms = min_time_s * 1000.0
    if runner.cuda_stream:
        timer = "cuda-events"
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        while len(times) < iters or sum(times) < budget_ms:
            start.record()
            runner(x)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    else:
        timer = "perf_counter"
        while len(times) < iters or sum(times) < budget_ms:
            t0 = time.perf_counter_ns()
            runner(x)
            runner.sync()
            times.append((time.perf_counter_ns() - t0) / 1e6)

    stats = latency_stats(times, b)
    stats.update(timer=timer, includes_copies=bool(runner.includes_copies))
    if keep_times:
        stats["times_ms"] = times
    return stats


def latency_stats(times: list[float], batch: int) -> dict[str, Any]:
    """p50/p90/p99/mean/min of per-call times (ms); throughput is images per second at the mean."""
    t = np.asarray(times, dtype=np.float64)
    p50, p90, p99 = np.percentile(t, [50, 90, 99])
    mean = float(t.mean())
    return {"batch": batch, "p50": float(p50), "p90": float(p90), "p99": float(p99), "mean": mean,
            "min": float(t.min()), "throughput_ips": batch * 1000.0 / mean, "iters": len(times)}


def evaluate(runner: Runner, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> dict[str, Any]:
    """Top-1 accuracy (%) of the runner's logits over (images, labels) batches."""
    correct = n = 0
    for x, y in batches:
        pred = runner(x).argmax(dim=1).cpu()
        correct += int((pred == y.cpu()).sum())
        n += int(y.numel())
    if n == 0:
        raise ValueError("evaluate got no images")
    return {"accuracy": 100.0 * correct / n, "n": n}


# ----------------------------------------------------------------------------- machine

def _version(*dists: str) -> str | None:
    for dist in dists:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
    return None


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_info() -> dict[str, Any]:
    """What the numbers were measured on; versions from package metadata (nothing heavy imported)."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "gpu": gpu,
        "cuda": torch.version.cuda if gpu else None,
        "os": platform.platform(),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "onnx": _version("onnx"),
            "onnxruntime": _version("onnxruntime", "onnxruntime-gpu"),
            "openvino": _version("openvino"),
            "nncf": _version("nncf"),
            "torch_pruning": _version("torch-pruning"),
            "tensorrt": _version("tensorrt", "tensorrt-cu13", "tensorrt-cu12", "tensorrt-cu11"),
        },
    }
