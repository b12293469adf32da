"""Engine stage: a TensorRT engine per artifact and requested precision, where TensorRT and a CUDA
GPU exist; a clear "skipped: why" otherwise (the building and running are in compress.trt).
"""

from __future__ import annotations

from compress.config import EngineConfig
from compress.context import Context
from compress.rundir import engine_path as engine_path_for
from compress.trt import EngineError, build_engine, fp16_onnx, tensorrt_status, timing_cache_path


def run(cfg: EngineConfig, ctx: Context) -> dict[str, dict[str, dict]]:
    """Build the engines the YAML asks for, for every artifact; never fails the pipeline.

    FP32/FP16 engines come from each float artifact's ONNX (FP16 via `fp16_onnx`), INT8
    engines from each quantize stage's QDQ ONNX. Returns {artifact: {precision: status}},
    where status is {"status": "ok"|"skipped"|"failed", "reason": ..., "engine": path}.
    """
    ok, reason = tensorrt_status()
    results: dict[str, dict[str, dict]] = {}
    cache = timing_cache_path(ctx.run_dir / ".trt-timing-cache") if ok else None
    for name, art in ctx.artifacts.items():
        wanted = ["int8"] if art.precision == "int8" else [p for p in cfg.precisions if p != "int8"]
        wanted = [p for p in wanted if p in cfg.precisions]
        results[name] = {}
        for precision in wanted:
            if not ok:
                results[name][precision] = {"status": "skipped", "reason": reason}
                continue
            engine_path = engine_path_for(ctx.run_dir, name, precision)
            try:
                if precision == "int8":
                    src = art.path("onnx_int8")
                elif precision == "fp16":
                    src = fp16_onnx(art.path("onnx"), ctx.run_dir / name / "model_fp16.onnx")
                    art.files["onnx_fp16"] = str(src)
                else:
                    src = art.path("onnx")
                info = build_engine(src, engine_path, min_batch=cfg.min_batch, opt_batch=cfg.opt_batch,
                                    max_batch=cfg.max_batch, timing_cache=cache, workspace_gb=cfg.workspace_gb,
                                    log=ctx.log)
            except EngineError as exc:
                results[name][precision] = {"status": "failed", "reason": str(exc).splitlines()[0]}
                ctx.log(f"[engine] {name} {precision}: failed: {exc}")
                continue
            art.files[f"engine_{precision}"] = info["engine"]
            results[name][precision] = {"status": "ok", "reason": None, "engine": info["engine"],
                                        "build_s": info["build_s"]}
            ctx.log(f"[engine] {name} {precision}: built in {info['build_s']:.1f} s")
    if not ok:
        ctx.log(f"[engine] TensorRT engines skipped: {reason}")
    return results
