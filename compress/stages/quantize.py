"""`quantize`: INT8 of the parent as a QDQ ONNX model TensorRT accepts (the recipe is in compress.quant).

NNCF on the PyTorch model or ONNX Runtime on its FP32 ONNX, calibrated on a seeded train or val
subset; `method: qat` fine-tunes NNCF's fake-quantized model with the distill loss; with
`max_accuracy_drop`, the most sensitive layers stay float until the val accuracy is close enough
(compress.quant.sensitivity). Writes model_int8.onnx and layers.md/json.
"""

from __future__ import annotations

import time

from torch import nn

from compress.config import KDConfig, QuantizeStage
from compress.context import Artifact, Context, StageError
from compress.onnx_export import export_bytes
from compress.quant import nncf_qdq, ort_qdq, write_qdq
from compress.quant import sensitivity as sens
from compress.quant.cpu_int8 import CPU_FILE, write_cpu_form


def _qat(cfg: QuantizeStage, ctx: Context):
    """QAT's fine-tune: Hinton KD (distill's `method: kd` loss) from the teachers, on the fake-quantized grid."""
    from compress.losses import build_loss
    from compress.training import fit

    teachers = [ctx.load_model(a) for a in ctx.teachers]
    kd = KDConfig(method="kd", temperature=cfg.temperature, alpha=cfg.alpha)

    def finetune(qmodel: nn.Module) -> dict:
        with build_loss(kd, teachers, qmodel, ctx.data, opts=cfg) as loss:
            return fit(qmodel, ctx.data, cfg, cfg.epochs, device=ctx.device, teachers=teachers, kd_loss=loss,
                       log=ctx.log, progress=ctx.progress, desc=f"{ctx.stage_name} (qat)")

    return finetune


def run(cfg: QuantizeStage, ctx: Context) -> Artifact:
    data, parent = ctx.data, ctx.inputs[0]
    for needs_val, what in ((cfg.calibration_split == "val", "calibration_split: val"),
                            (cfg.max_accuracy_drop is not None, "max_accuracy_drop (judged on val)")):
        if needs_val and not data.num_val:
            raise StageError(f"stage {ctx.stage_name!r}: {what} needs a validation split, but data.val_size is 0")
    model = ctx.load_model(parent).eval().cpu()
    calib = data.calibration_subset(cfg.calibration_split, cfg.calibration_size, cfg.calibration_seed).cpu()
    path = ctx.stage_dir / "model_int8.onnx"
    start = time.perf_counter()
    if cfg.backend == "onnxruntime":
        fp32 = parent.path("onnx")  # the parent's exported FP32 model; exported here when there is none
        source = fp32 if fp32 is not None and fp32.is_file() else export_bytes(model, ctx.input_shape(), 17)
        proto, info = ort_qdq(source, calib, subset_size=cfg.calibration_size, calibrate_method=cfg.calibrate_method)
    else:
        finetune = _qat(cfg, ctx) if cfg.method == "qat" else None
        proto, info = nncf_qdq(model, calib, ctx.input_shape(), subset_size=cfg.calibration_size, finetune=finetune)

    # Scored against the FP32 parent on val (train when there is no val split; then agreement only).
    split = "val" if data.num_val else "train"
    scorer = sens.Scorer.of_model(lambda: data.eval_batches(split), model)
    layers = sens.find_layers(proto)
    decision = sens.accuracy_aware(proto, layers, scorer, max_drop=cfg.max_accuracy_drop,
                                   sweep_images=cfg.sensitivity_images, max_float_fraction=cfg.max_float_fraction,
                                   always_sweep=cfg.sensitivity_sweep, log=lambda m: ctx.log(f"[{ctx.stage_name}] {m}"))
    by_name = {layer.name: layer for layer in layers}
    final = sens.keep_float(proto, [by_name[n] for n in decision.kept_float])
    info = {**write_qdq(final, path), **info, "seconds": round(time.perf_counter() - start, 3)}

    final_score = decision.final
    summary = {"stage": ctx.stage_name, "backend": cfg.backend, "method": cfg.method,
               "calibration_split": cfg.calibration_split, "calibration_seed": cfg.calibration_seed,
               "calibration_images": info["calibration_images"], "eval_split": split, "images": scorer.n,
               "fp32_accuracy": scorer.fp32_accuracy if split == "val" else None,
               "int8_accuracy": decision.int8_accuracy if split == "val" else None,
               "final_accuracy": final_score["accuracy"] if split == "val" else None,
               "max_accuracy_drop": cfg.max_accuracy_drop, "target_met": decision.target_met,
               "kept_float": decision.kept_float, "sweep_ran": decision.sensitivity is not None,
               "sweep_reason": decision.sweep_reason, "sweep_images": decision.sweep_images,
               "max_float_layers": decision.max_float_layers, "greedy": decision.greedy}
    rows = sens.layer_rows(layers, decision)
    layers_json, layers_md = sens.write_layer_report(ctx.stage_dir, summary, rows)

    info.update({
        "quantized_layers": len(layers),
        "kept_float_layers": decision.kept_float,
        "val_accuracy_fp32": summary["fp32_accuracy"],
        "val_accuracy_int8_all_layers": summary["int8_accuracy"],
        "val_accuracy": summary["final_accuracy"],
        "val_accuracy_drop": (None if split != "val" else round(scorer.fp32_accuracy - final_score["accuracy"], 4)),
        "max_accuracy_drop": cfg.max_accuracy_drop,
        "accuracy_target_met": decision.target_met,
        "sensitivity_sweep": summary["sweep_ran"],
        "calibration_split": cfg.calibration_split,
        "calibration_seed": cfg.calibration_seed,
        "top1_agreement_with_fp32": final_score["agreement"],
    })
    if decision.target_met is False:
        ctx.log(f"[{ctx.stage_name}] WARNING: max_accuracy_drop {cfg.max_accuracy_drop} was not reached with up to "
                f"{decision.max_float_layers} of {len(layers)} layers in float; shipping the best found "
                f"({final_score['accuracy']:.2f}% vs FP32 {scorer.fp32_accuracy:.2f}% on val, "
                f"{len(decision.kept_float)} layers float)")
    acc = (f"val top-1 {final_score['accuracy']:.2f}% (FP32 {scorer.fp32_accuracy:.2f}%), " if split == "val" else "")
    ctx.log(f"[{ctx.stage_name}] INT8 QDQ ONNX ({cfg.backend}): {info['quantize_linear']} Q / "
            f"{info['dequantize_linear']} DQ nodes, {info['calibration_images']} {cfg.calibration_split} calibration "
            f"images, {acc}top-1 agreement with FP32 {final_score['agreement'] * 100:.1f}%, "
            f"{len(decision.kept_float)} of {len(layers)} layers kept float")
    files = {"onnx_int8": str(path), "layers": str(layers_md), "layers_json": str(layers_json)}
    # The CPU form (QDQ u8s8, int32 biases: what ONNX Runtime's CPU kernels fuse and OpenVINO reads right),
    # PTQ from the FP32 parent on the same calibration images; kept only within the drop limit on `split`.
    fp32 = parent.path("onnx")
    cpu = write_cpu_form(fp32 if fp32 is not None and fp32.is_file() else export_bytes(model, ctx.input_shape(), 17),
                         calib, ctx.stage_dir / CPU_FILE, eval_batches=lambda: data.eval_batches(split),
                         fp32_accuracy=scorer.fp32_accuracy if split == "val" else None,
                         max_drop=cfg.max_accuracy_drop if cfg.max_accuracy_drop is not None else 0.3,
                         subset_size=cfg.calibration_size, calibrate_method=cfg.calibrate_method,
                         log=lambda m: ctx.log(f"[{ctx.stage_name}] {m}"))
    info["cpu_int8"] = {k: cpu[k] for k in ("format", "accuracy", "accuracy_drop", "max_drop", "shipped")}
    if cpu["shipped"]:
        files["onnx_int8_cpu"] = cpu["onnx_int8_cpu"]
    return Artifact(name=ctx.stage_name, stage=cfg.type, parent=parent.name, model=parent.model,
                    files=files,
                    params=parent.params, macs=parent.macs, precision="int8",
                    metrics={**info, "teachers": parent.metrics.get("teachers", [])})
