"""`prune`: the parent pruned to a measured budget, then fine-tuned with the stage's distillation loss.

The pruning itself (DepGraph, the importances, the budget schedule) is compress.prune; this adapter
wires in the stage's training phases: an optional sparsity phase for `bn_scale`, BN recalibration
and optional fine-tuning after every round, the loss gradients `taylor` ranks by, and the final
fine-tune. Every phase trains with the same loss as distill (`method:`, `features:`).
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from compress import distributed
from compress.config import PruneStage
from compress.context import Artifact, Context, StageError
from compress.prune import (LATENCY_ITERS, bn_l1, bn_scales, check_batchnorm, latency_probe, prune_model,
                            write_layer_report)


def _checkpoint(ctx: Context, phase: str) -> Path | None:
    """Each training phase resumes from its own file (the pipeline deletes checkpoint-*.pt once done)."""
    if ctx.checkpoint is None or phase == "finetune":
        return ctx.checkpoint
    return ctx.checkpoint.with_name(f"{ctx.checkpoint.stem}-{phase}.pt")


def _train(cfg: PruneStage, ctx: Context, model: nn.Module, teachers: list[nn.Module], epochs: int, phase: str,
           penalty=None) -> dict:
    """``epochs`` of the stage's distillation loss (method:, features: as in distill), plus ``penalty``."""
    from compress.losses import build_loss
    from compress.training import fit

    with build_loss(cfg, teachers, model, ctx.data) as kd_loss:
        return fit(model, ctx.data, cfg, epochs, device=ctx.device, teachers=teachers, kd_loss=kd_loss,
                   penalty=penalty, log=ctx.log, progress=ctx.progress,
                   desc=ctx.stage_name if phase == "finetune" else f"{ctx.stage_name} ({phase})",
                   checkpoint=_checkpoint(ctx, phase))


def run(cfg: PruneStage, ctx: Context) -> Artifact:
    from compress.losses import build_loss
    from compress.training import evaluate, gradient_pass, recalibrate_bn

    parent, data = ctx.inputs[0], ctx.data
    model = ctx.load_model(parent).to(ctx.device)
    teachers = [ctx.load_model(a).to(ctx.device).eval().requires_grad_(False) for a in ctx.teachers]
    split = "val" if data.num_val else "train"
    info: dict = {}
    try:
        if cfg.importance == "bn_scale":  # before a sparsity phase that would have nothing to push
            check_batchnorm(model)
    except ValueError as exc:
        raise StageError(f"stage {ctx.stage_name!r}: {exc}") from None
    if cfg.sparsity is not None:  # network slimming: push the BN scales the network can spare towards 0
        strength, before = cfg.sparsity.strength, bn_scales(model)
        _train(cfg, ctx, model, teachers, cfg.sparsity.epochs, "sparsity", penalty=lambda m: strength * bn_l1(m))
        info["sparsity"] = {"epochs": cfg.sparsity.epochs, "strength": strength, "bn_scales_before": before,
                            "bn_scales_after": bn_scales(model), "accuracy": evaluate(model, data.eval_batches(split))}
        ctx.log(f"[{ctx.stage_name}] sparsity training: mean |BN scale| {before['mean_abs']:.3f} -> "
                f"{info['sparsity']['bn_scales_after']['mean_abs']:.3f}; {split} accuracy "
                f"{info['sparsity']['accuracy']:.2f}%")

    rounds, taylor_calls = itertools.count(1), itertools.count()

    def after_round(m: nn.Module) -> None:
        k = next(rounds)
        recalibrate_bn(m, data.train_batches(0, augment=False))
        if cfg.finetune_between_epochs and k < cfg.iterative_steps:
            _train(cfg, ctx, m, teachers, cfg.finetune_between_epochs, f"round{k}")

    def taylor_gradients(m: nn.Module) -> None:
        # The logit terms of the stage's loss (a feature term would bring untrained adapters).
        batches = data.train_batches(next(taylor_calls), cfg.batch_size or data.batch_size, augment=False)
        with build_loss(cfg.model_copy(update={"features": None}), teachers, m, data) as loss:
            gradient_pass(m, itertools.islice(batches, cfg.taylor_batches), teachers=teachers, kd_loss=loss)

    latency_fn, where = None, None
    if cfg.target_latency_ms is not None:
        target, ratio = "latency", 1.0
        where = f"{cfg.latency_runtime}, batch {cfg.latency_batch}, median of {LATENCY_ITERS} runs"
        latency_fn = latency_probe(cfg.latency_runtime, ctx.input_shape(), batch=cfg.latency_batch,
                                   device=ctx.device if cfg.latency_runtime == "torch" else "cpu")
    else:
        target, ratio = ("macs", cfg.target_macs) if cfg.target_macs is not None else ("params", cfg.target_params)
    try:
        info.update(prune_model(
            model, torch.zeros(1, *ctx.input_shape(), device=ctx.device), target=target, ratio=ratio,
            latency_ms=cfg.target_latency_ms, latency_fn=latency_fn, importance=cfg.importance,
            round_to=cfg.round_to, iterative_steps=cfg.iterative_steps, global_pruning=cfg.global_pruning,
            calib_fn=after_round, gradient_fn=taylor_gradients if cfg.importance == "taylor" else None))
    except ValueError as exc:
        raise StageError(f"stage {ctx.stage_name!r}: {exc}" + (f" (latency on {where})" if where else "")) from None
    layers = info.pop("layers")
    if distributed.is_main():  # under torchrun every process pruned alike; rank 0 writes
        write_layer_report(layers, ctx.stage_dir, f"{ctx.stage_name}: pruned layers ({cfg.importance}, "
                                                  f"{info['macs_after'] / info['macs_before']:.0%} of the MACs)")
    if where:
        info["latency"] = where
        ctx.log(f"[{ctx.stage_name}] latency {info['latency_ms_before']:.3f} -> {info['latency_ms_after']:.3f} ms "
                f"(target {cfg.target_latency_ms:g} ms; {where})")
    info["accuracy_before_finetune"] = evaluate(model, data.eval_batches(split))
    ctx.log(f"[{ctx.stage_name}] MACs {info['macs_before']:,} -> {info['macs_after']:,} "
            f"({100 * info['macs_after'] / info['macs_before']:.1f}%), params {info['params_before']:,} -> "
            f"{info['params_after']:,}; {split} accuracy before fine-tuning {info['accuracy_before_finetune']:.2f}%")
    metrics = {"best_accuracy": info["accuracy_before_finetune"], "best_split": split}
    if cfg.finetune_epochs:
        metrics = _train(cfg, ctx, model, teachers, cfg.finetune_epochs, "finetune")
    metrics.update(prune=info, teachers=[a.name for a in ctx.teachers])
    artifact = ctx.save_model(model, parent.model, cfg.type, metrics, parent=parent.name)
    artifact.files["layers"] = str(ctx.stage_dir / "layers.md")  # as quantize names them
    artifact.files["layers_json"] = str(ctx.stage_dir / "layers.json")
    return artifact
