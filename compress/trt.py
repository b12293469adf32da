"""TensorRT: engines built the strongly-typed way that TensorRT 10 and 11 both accept, and run.

TensorRT 11 removed the weak-typing builder flags (``BuilderFlag.FP16``, ``INT8``...): a
network is strongly typed and every tensor has the type the ONNX graph gives it. So the
precision of an engine is decided *before* TensorRT sees the model:

  fp32  the exported ONNX as is (TensorRT may still use TF32 for FP32 math, its default)
  fp16  ``fp16_onnx``: FP16 weights and compute, FP32 inputs/outputs (a Cast at each end)
  int8  the quantize stage's Q/DQ ONNX (explicit quantization)

An engine only runs on the GPU model and TensorRT version it was built with, so each
``model.engine`` has a sidecar ``model.engine.json`` manifest that ``TrtRunner`` checks
before deserializing. ``tensorrt`` is imported inside functions only: this module imports
(and ``fp16_onnx`` runs) on a machine without it.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from compress import install_hint
from compress.io import atomic_write_bytes, atomic_write_json, sha256_file
from compress.trt_exec import EngineExec

MANIFEST_FORMAT = "compress.engine/1"
_INSTALL_HINT = install_hint("tensorrt")


class EngineError(RuntimeError):
    """An engine that cannot be built, loaded or run; the message is meant for the user."""


# ----------------------------------------------------------------------------- availability

def _import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError:
        raise EngineError(f"tensorrt is not installed ({_INSTALL_HINT})") from None
    except Exception as exc:  # installed but broken (missing CUDA libraries, ...)
        raise EngineError(f"tensorrt failed to import: {type(exc).__name__}: {exc}") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} is too old: compress needs TensorRT 10 or newer")
    return trt


def tensorrt_status() -> tuple[bool, str]:
    """(True, "TensorRT x.y on <GPU>") or (False, every reason it cannot be used here)."""
    reasons, trt = [], None
    try:
        trt = _import_tensorrt()
    except EngineError as exc:
        reasons.append(str(exc))
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU (torch.cuda.is_available() is False)")
    if reasons:
        return False, "; ".join(reasons)
    return True, f"TensorRT {trt.__version__} on {torch.cuda.get_device_name()}"


def _this_machine(trt, device: int | None = None) -> dict[str, str | None]:
    """What an engine (and a timing cache) is tied to."""
    index = torch.cuda.current_device() if device is None else device
    major, minor = torch.cuda.get_device_capability(index)
    return {
        "tensorrt": trt.__version__,
        "cuda": torch.version.cuda,          # the CUDA torch was built for; TensorRT's wheel matches it
        "gpu": torch.cuda.get_device_name(index),
        "compute_capability": f"{major}.{minor}",
    }


def timing_cache_path(cache_dir: Path) -> Path:
    """One timing cache per GPU model, TensorRT version and CUDA version (its validity key)."""
    ok, reason = tensorrt_status()
    if not ok:
        raise EngineError(f"cannot name a timing cache: {reason}")
    m = _this_machine(_import_tensorrt())
    slug = re.sub(r"[^a-z0-9.]+", "-", m["gpu"].lower()).strip("-")
    return Path(cache_dir) / f"{slug}-trt{m['tensorrt']}-cuda{m['cuda']}.timing-cache"


def manifest_path(engine_path: Path) -> Path:
    engine_path = Path(engine_path)
    return engine_path.with_name(engine_path.name + ".json")


def check_engine(plan: Path, device: int | None = None) -> tuple[bool, str]:
    """Can this machine run this engine? (ok, reason) from its sidecar manifest, without deserializing it:
    the GPU, compute capability and TensorRT version it was built for, and its bytes."""
    plan = Path(plan)
    sidecar = manifest_path(plan)
    if not sidecar.is_file():
        return False, f"{plan.name} has no sidecar manifest {sidecar.name}"
    try:
        info = json.loads(sidecar.read_text())
        if not isinstance(info, dict):
            raise ValueError("not a JSON object")
    except (OSError, ValueError) as exc:
        return False, f"{sidecar}: engine manifest unreadable ({exc})"
    ok, reason = tensorrt_status()
    if not ok:
        return False, f"{plan.name} was built for {info.get('gpu')} (TensorRT {info.get('tensorrt')}); " \
                      f"it cannot be checked here: {reason}"
    here = _this_machine(_import_tensorrt(), device)
    for key in ("gpu", "compute_capability", "tensorrt"):
        if info.get(key) != here[key]:
            return False, f"{plan.name} was built for {key} {info.get(key)!r}, this machine has {here[key]!r}"
    if info.get("engine_sha256") not in (None, sha256_file(plan)):
        return False, f"{plan} does not match its manifest (partial write?)"
    return True, f"built for {here['gpu']}, TensorRT {here['tensorrt']}"


# ----------------------------------------------------------------------------- FP16 ONNX

# Inputs that ONNX types as float32 only, whatever the data type of the rest of the node.
_KEEP_FP32_INPUTS = {"Resize": (1, 2), "Upsample": (1,)}
_DTYPE_ATTR_OPS = {"EyeLike", "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli"}
_QUANT_OPS = {"QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "DynamicQuantizeLinear"}
_FP16_MAX = float(np.finfo(np.float16).max)


def fp16_onnx(src: Path, dst: Path) -> Path:
    """Write ``src`` with FP16 weights and compute, and FP32 graph inputs and outputs.

    Float initializers and Constant/ConstantOfShape values become float16, ``Cast(to=float)``
    becomes ``Cast(to=float16)``, float value_info becomes float16, and a Cast is inserted
    after each float input and before each float output, so callers feed and read FP32.
    Float *attributes* (BatchNorm epsilon, LeakyRelu alpha) stay as they are: ONNX types them
    float regardless of the tensors. Weights beyond the FP16 range are clipped to +-65504.
    Subgraphs (If/Loop) and already-quantized graphs are refused.
    """
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
    model = onnx.load(str(src))
    graph = model.graph
    for node in graph.node:
        if node.op_type in _QUANT_OPS:
            raise ValueError(f"{src}: already quantized ({node.op_type} node {node.name!r}); "
                             "build its engine from the ONNX as it is")
        if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
            raise ValueError(f"{src}: {node.op_type} node {node.name!r} has a subgraph; fp16_onnx does not "
                             "convert control flow")

    keep = {node.input[i] for node in graph.node for i in _KEEP_FP32_INPUTS.get(node.op_type, ())
            if i < len(node.input) and node.input[i]}

    def half(arr: np.ndarray) -> np.ndarray:
        return np.clip(arr, -_FP16_MAX, _FP16_MAX).astype(np.float16)

    def half_tensor(t: onnx.TensorProto) -> onnx.TensorProto:
        return numpy_helper.from_array(half(numpy_helper.to_array(t)), t.name)

    for init in graph.initializer:
        if init.data_type == FLOAT and init.name not in keep:
            init.CopyFrom(half_tensor(init))

    for node in graph.node:
        if any(out in keep for out in node.output):
            continue
        for attr in node.attribute:
            if node.op_type in ("Constant", "ConstantOfShape") and attr.name == "value" and attr.t.data_type == FLOAT:
                attr.t.CopyFrom(half_tensor(attr.t))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = HALF
            elif node.op_type in _DTYPE_ATTR_OPS and attr.name == "dtype" and attr.i == FLOAT:
                attr.i = HALF
        if node.op_type == "Constant":  # value_float(s) always make float32: rewrite as a float16 tensor
            scalar = [a for a in node.attribute if a.name in ("value_float", "value_floats")]
            if scalar:
                a = scalar[0]
                arr = np.array(a.f if a.name == "value_float" else list(a.floats), dtype=np.float32)
                node.attribute.remove(a)
                node.attribute.append(helper.make_attribute("value", numpy_helper.from_array(half(arr))))

    for vi in graph.value_info:
        if vi.type.tensor_type.elem_type == FLOAT and vi.name not in keep:
            vi.type.tensor_type.elem_type = HALF

    def rename(old: str, new: str, *, outputs: bool) -> None:
        for node in graph.node:
            for seq in (node.input, node.output) if outputs else (node.input,):
                for i, name in enumerate(seq):
                    if name == old:
                        seq[i] = new

    initializers = {i.name for i in graph.initializer}
    casts_in, casts_out = [], []
    for inp in graph.input:
        if inp.type.tensor_type.elem_type == FLOAT and inp.name not in initializers:
            inner = f"{inp.name}__fp16"
            rename(inp.name, inner, outputs=False)
            casts_in.append(helper.make_node("Cast", [inp.name], [inner], to=HALF, name=f"{inp.name}__to_fp16"))
    for out in graph.output:
        if out.type.tensor_type.elem_type == FLOAT:
            inner = f"{out.name}__fp16"
            rename(out.name, inner, outputs=True)
            casts_out.append(helper.make_node("Cast", [inner], [out.name], to=FLOAT, name=f"{out.name}__to_fp32"))
    nodes = casts_in + list(graph.node) + casts_out
    graph.ClearField("node")
    graph.node.extend(nodes)

    try:  # strict type and shape inference: a dtype we missed fails here, not inside TensorRT
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:
        raise ValueError(f"{src}: the FP16 graph does not type-check: {str(exc).splitlines()[0][:300]}") from None
    return atomic_write_bytes(dst, model.SerializeToString())


def _onnx_precision(onnx_path: Path) -> str:
    """What a strongly-typed engine built from this ONNX computes in."""
    import onnx

    model = onnx.load(str(onnx_path), load_external_data=False)
    if any(n.op_type in _QUANT_OPS for n in model.graph.node):
        return "int8"
    if any(i.data_type == onnx.TensorProto.FLOAT16 for i in model.graph.initializer):
        return "fp16"
    return "fp32"


# ----------------------------------------------------------------------------- build

def _make_logger(trt, log: Callable[[str], None]):
    class _Logger(trt.ILogger):
        """Keeps the errors for the exception message; passes warnings to the run's log."""

        def __init__(self):
            trt.ILogger.__init__(self)
            self.errors: list[str] = []

        def log(self, severity, msg):
            if severity in (trt.ILogger.Severity.INTERNAL_ERROR, trt.ILogger.Severity.ERROR):
                self.errors.append(str(msg))
            elif severity == trt.ILogger.Severity.WARNING:
                log(f"TensorRT: {msg}")

    return _Logger()


def _network_flags(trt) -> int:
    # TensorRT 10: strongly typed is opt-in through this flag. TensorRT 11: always on, the flag is
    # deprecated (and EXPLICIT_BATCH is gone), so pass nothing.
    flag = getattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED", None)
    if int(trt.__version__.split(".")[0]) >= 11 or flag is None:
        return 0
    return 1 << int(flag)


def build_engine(onnx_path: Path, engine_path: Path, *, min_batch: int, opt_batch: int, max_batch: int,
                 timing_cache: Path | None = None, workspace_gb: float = 2.0,
                 log: Callable[[str], None] = print) -> dict[str, Any]:
    """Build a strongly-typed engine for batch sizes min..max (tuned for opt); return its manifest.

    The precision is the ONNX's own (see the module docstring). The engine and its sidecar
    manifest are written atomically; the timing cache, if given, is loaded first and saved after.
    """
    onnx_path, engine_path = Path(onnx_path), Path(engine_path)
    if not 1 <= min_batch <= opt_batch <= max_batch:
        raise EngineError(f"batch profile must satisfy 1 <= min <= opt <= max, got {min_batch}/{opt_batch}/{max_batch}")
    if not onnx_path.is_file():
        raise EngineError(f"{onnx_path}: no such ONNX file")
    ok, reason = tensorrt_status()
    if not ok:
        raise EngineError(f"cannot build {engine_path.name}: {reason}")
    trt = _import_tensorrt()
    t0 = time.perf_counter()

    logger = _make_logger(trt, log)
    builder = trt.Builder(logger)
    network = builder.create_network(_network_flags(trt))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(onnx_path)):  # from file: external weights resolve next to it
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)] or logger.errors
        raise EngineError(f"TensorRT could not parse {onnx_path}:\n  " + "\n  ".join(errors))

    if network.num_inputs != 1:
        raise EngineError(f"{onnx_path}: expected one input (the image batch), found {network.num_inputs}")
    inp = network.get_input(0)
    shape = tuple(inp.shape)
    if any(d < 0 for d in shape[1:]):
        raise EngineError(f"{onnx_path}: input {inp.name!r} has shape {shape}; only the batch dim may be dynamic")
    if shape[0] >= 0 and not min_batch == max_batch == shape[0]:
        raise EngineError(f"{onnx_path}: input {inp.name!r} has a fixed batch of {shape[0]}; re-export it with a "
                          f"dynamic batch dim to build for batches {min_batch}..{max_batch}")
    rest = shape[1:]
    profile_shapes = {"min": (min_batch, *rest), "opt": (opt_batch, *rest), "max": (max_batch, *rest)}

    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    profile.set_shape(inp.name, profile_shapes["min"], profile_shapes["opt"], profile_shapes["max"])
    config.add_optimization_profile(profile)

    if timing_cache is not None:
        data = Path(timing_cache).read_bytes() if Path(timing_cache).is_file() else b""
        cache = config.create_timing_cache(data)
        if cache is None or not config.set_timing_cache(cache, ignore_mismatch=False):
            log(f"timing cache {timing_cache} was rejected (other GPU or TensorRT?); starting a fresh one")
            config.set_timing_cache(config.create_timing_cache(b""), ignore_mismatch=False)

    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        detail = "\n  ".join(logger.errors) or "(TensorRT logged no error)"
        raise EngineError(f"TensorRT failed to build {engine_path.name} from {onnx_path}:\n  {detail}")
    engine_bytes = bytes(memoryview(serialized))
    atomic_write_bytes(engine_path, engine_bytes)
    if timing_cache is not None:
        atomic_write_bytes(timing_cache, bytes(memoryview(config.get_timing_cache().serialize())))

    manifest = {
        "format": MANIFEST_FORMAT,
        **_this_machine(trt),
        "precision": _onnx_precision(onnx_path),
        "onnx": str(onnx_path),
        "onnx_sha256": sha256_file(onnx_path),
        "engine_sha256": sha256_file(engine_path),
        "input": inp.name,
        "profile": {k: list(v) for k, v in profile_shapes.items()},
        "workspace_gb": workspace_gb,
        # FP32 layers may use TF32 tensor cores unless this is off (TensorRT's default is on)
        "tf32": bool(config.get_flag(trt.BuilderFlag.TF32)) if hasattr(trt.BuilderFlag, "TF32") else None,
        "build_s": round(time.perf_counter() - t0, 2),
        "size_bytes": len(engine_bytes),
    }
    atomic_write_json(manifest_path(engine_path), manifest)
    return {**manifest, "engine": str(engine_path), "manifest": str(manifest_path(engine_path))}


# ----------------------------------------------------------------------------- run

class TrtRunner:
    """Runs a serialized engine on torch CUDA tensors, on torch's current stream.

    Refuses (``EngineError``) an engine whose manifest names another GPU, compute capability
    or TensorRT version, or whose bytes do not match the manifest, before deserializing it.
    """

    runtime = "tensorrt"
    cuda_stream = True          # work is queued on torch's current stream: time it with CUDA events
    includes_copies = False     # inputs already on the GPU are used in place
    threads = None

    def __init__(self, engine_path: Path, device: str | torch.device = "cuda"):
        self.engine_path = Path(engine_path)
        ok, reason = tensorrt_status()
        if not ok:
            raise EngineError(f"cannot run {self.engine_path.name}: {reason}")
        trt = self._trt = _import_tensorrt()
        self.input_device = torch.device(device)
        if self.input_device.type != "cuda":
            raise EngineError(f"TensorRT engines run on a CUDA device, not {self.input_device}")
        if self.input_device.index is None:
            self.input_device = torch.device("cuda", torch.cuda.current_device())

        if not self.engine_path.is_file():
            raise EngineError(f"{self.engine_path}: no such engine file")
        ok, reason = check_engine(self.engine_path, self.input_device.index)
        if not ok:
            raise EngineError(f"{reason}; rebuild the engine here")
        self.manifest = json.loads(manifest_path(self.engine_path).read_text())
        data = self.engine_path.read_bytes()
        here = _this_machine(trt, self.input_device.index)
        self.precision = self.manifest.get("precision", "unknown")
        self.device = here["gpu"]
        self._logger = _make_logger(trt, lambda msg: None)
        self._exec = EngineExec(data, self.input_device, trt=trt, logger=self._logger, name=str(self.engine_path),
                                error=EngineError)
        # Older bindings cannot tell the profile: fall back on what we asked the builder for.
        self.batch_range = self._exec.batch_range or (self.manifest["profile"]["min"][0],
                                                      self.manifest["profile"]["max"][0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of the first output, on the GPU, queued on the current stream."""
        lo, hi = self.batch_range
        if not lo <= x.shape[0] <= hi:
            raise EngineError(f"batch {x.shape[0]} is outside {self.engine_path.name}'s profile: "
                              f"batches {lo}..{hi} are allowed; rebuild with a wider engine profile")
        return self._exec(x)

    def sync(self) -> None:
        torch.cuda.synchronize(self.input_device)
