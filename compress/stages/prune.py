"""Prune stage: structured channel pruning with Torch-Pruning's dependency graph.

From "DepGraph: Towards Any Structural Pruning" (Fang et al., CVPR 2023). Coupled layers
(a residual sum, a depthwise conv and its producer, a squeeze-excite gate) are grouped and
lose the same channels together, so the pruned model is a smaller dense network, not a
masked one. By default every layer loses the same share of its channels, ranked by weight
magnitude within the layer: ranking globally by raw magnitude (`global_pruning`) compares
layers of different scales and, on our Fashion-MNIST students at half the MACs, emptied
whole useful layers (accuracy at chance before fine-tuning, against ~50-60% per layer).

What ranks the channels (``importance``): weight magnitude (l1, l2), LAMP, FPGM, random, and
two that look at more than the weights:
  * taylor: |weight x gradient| of the loss, summed over the group (Molchanov et al., "Importance
    Estimation for Neural Network Pruning", CVPR 2019); the gradients come from the stage's own
    loss on a few training batches, recomputed before every round;
  * bn_scale: |BatchNorm scale| (Liu et al., "Learning Efficient Convolutional Networks through
    Network Slimming", ICCV 2017), best after a short training phase with an L1 penalty on the
    scales (``sparsity:``) that pushes the channels the network can spare towards zero.

The target is a measured budget, not a channel ratio: keep ``ratio`` of the MACs or parameters,
or get the measured latency (median of timed runs on ONNX Runtime or PyTorch) under a number
of milliseconds. Channel ratio and cost are related only roughly (MACs fall about
quadratically, less where layers are protected; latency also has a floor of fixed overheads),
so we let torch-pruning take many small steps and stop as soon as the measurement is under
budget, in ``iterative_steps`` rounds whose budgets shrink geometrically; ``calib_fn`` runs
after each round (BN recalibration, a short fine-tune) so later rounds rank the channels of a
model that has recovered.

Pitfall (Torch-Pruning's own): a pruned model no longer matches its class's constructor.
Save it with ``compress.io.save_model``, which records every layer's shape.
"""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

IMPORTANCES = ("l1", "l2", "lamp", "fpgm", "random", "taylor", "bn_scale")
TARGETS = ("macs", "params", "latency")

# The pruner walks the channel ratio 0 -> _MAX_CHANNEL_RATIO in this many steps, so one step
# removes ~1% of the channels and the target is met closely (within a few % on thin models,
# where round_to makes a 16-channel layer drop to 8 at once).
_SUBSTEPS = 100
_MAX_CHANNEL_RATIO = 0.95
# A layer stops being pruned once it has lost this fraction of its channels (and is never emptied).
_MAX_LAYER_RATIO = 0.9
# Latency probes: untimed warm-up calls, then timed calls whose median is the measurement.
_LATENCY_WARMUP = 10
_LATENCY_ITERS = 50


def _importance(name: str):
    import torch_pruning as tp

    factories = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
        "taylor": lambda: tp.importance.GroupTaylorImportance(),  # reads .grad: see gradient_fn
        "bn_scale": lambda: tp.importance.BNScaleImportance(),    # groups without BN are left alone
    }
    if name not in factories:
        raise ValueError(f"unknown importance {name!r}; choose one of {sorted(factories)}")
    return factories[name]()


def _count(model: nn.Module, example_inputs: torch.Tensor) -> tuple[int, int]:
    """(MACs, params) of one forward pass on a single example, the way ``compress.registry.count_macs`` counts."""
    import torch_pruning as tp

    with torch.no_grad():
        macs, params = tp.utils.count_ops_and_params(model, example_inputs[:1])
    return int(macs), int(params)


def _classifier(model: nn.Module, example_inputs: torch.Tensor) -> nn.Module:
    """The layer whose outputs are the logits: ``model.fc``, else the last conv/linear layer to run."""
    if isinstance(getattr(model, "fc", None), nn.Linear):
        return model.fc
    last = []
    hooks = [m.register_forward_hook(lambda mod, *_: last.append(mod))
             for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    try:
        with torch.no_grad():
            model(example_inputs[:1])
    finally:
        for h in hooks:
            h.remove()
    if not last:
        raise ValueError("cannot prune: the model has no Linear or Conv2d layer")
    return last[-1]


def _check_batchnorm(model: nn.Module) -> None:
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine for m in model.modules()):
        raise ValueError("importance 'bn_scale' ranks channels by their BatchNorm scale, and the model has no "
                         "BatchNorm layer with a scale; choose another importance")


def bn_l1(model: nn.Module) -> torch.Tensor:
    """Sum of |scale| over every affine BatchNorm: network slimming's sparsity penalty (times a strength)."""
    scales = [m.weight.abs().sum() for m in model.modules()
              if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine]
    return torch.stack(scales).sum() if scales else sum(p.sum() * 0 for p in model.parameters())


def layer_table(model: nn.Module, example_inputs: torch.Tensor) -> dict[str, dict]:
    """Every Conv2d and Linear by name: type, input and output channels, groups, and its MACs on one example."""
    import torch_pruning as tp

    with torch.no_grad():
        _, _, flops, _ = tp.utils.count_ops_and_params(model, example_inputs[:1], layer_wise=True)
    table = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            table[name] = {"type": "Conv2d", "in": m.in_channels, "out": m.out_channels, "groups": m.groups}
        elif isinstance(m, nn.Linear):
            table[name] = {"type": "Linear", "in": m.in_features, "out": m.out_features, "groups": 1}
        else:
            continue
        table[name]["macs"] = int(flops.get(m) or 0)
    return table


def latency_probe(runtime: str, input_shape: tuple[int, ...], *, batch: int = 1,
                  device: str | torch.device = "cpu", warmup: int = _LATENCY_WARMUP,
                  iters: int = _LATENCY_ITERS) -> Callable[[nn.Module], float]:
    """A function model -> its median latency in ms at ``batch``, timed the way the benchmark stage times it.

    ``onnxruntime``: the model is exported to ONNX (as the export stage does) and run on the CPU;
    ``torch``: the module itself runs on ``device``. Each call measures afresh.
    """
    # The runners, the timer and the exporter are the other stages' own, so the number the
    # pruner aims at is the number the report will show.
    from compress import distributed
    from compress.runtime import OrtRunner, TorchRunner, measure_latency
    from compress.onnx_export import export_onnx

    if runtime not in ("onnxruntime", "torch"):
        raise ValueError(f"latency runtime must be 'onnxruntime' or 'torch', got {runtime!r}")
    x = torch.zeros(batch, *input_shape)

    def measure(model: nn.Module) -> float:
        was_training = model.training
        try:
            if runtime == "torch":
                ms = measure_latency(TorchRunner(model, "fp32", device), x, warmup, iters)["p50"]
            else:
                with tempfile.TemporaryDirectory() as tmp:
                    path = export_onnx(model, Path(tmp) / "model.onnx", tuple(input_shape))
                    ms = measure_latency(OrtRunner(path), x, warmup, iters)["p50"]
        finally:
            model.train(was_training)
        # Under torchrun every process prunes; rank 0's clock decides for all, so they prune alike.
        return distributed.broadcast(ms)

    return measure


def prune_model(model: nn.Module, example_inputs: torch.Tensor, *,
                target: str = "macs",           # what the budget counts: "macs", "params" or "latency"
                ratio: float = 0.5,             # macs/params: keep this fraction (0.5: half the MACs remain)
                latency_ms: float | None = None,  # latency: the budget, in ms as latency_fn measures them
                latency_fn: Callable[[nn.Module], float] | None = None,  # latency: model -> ms (latency_probe)
                importance: str = "l2",         # channel score: one of IMPORTANCES
                round_to: int = 8,              # pruned layers keep a multiple of this many channels
                iterative_steps: int = 5,       # rounds, each followed by calib_fn
                global_pruning: bool = False,   # rank channels across layers (True) or prune each layer alike
                calib_fn: Callable[[nn.Module], None] | None = None,     # after each round (BN recalibration...)
                gradient_fn: Callable[[nn.Module], None] | None = None,  # taylor: fill .grad (loss.backward)
                ) -> dict:
    """Prune ``model`` in place until its MACs or params are at most ``ratio`` of what they were, or
    its latency (``latency_fn(model)``) is at most ``latency_ms``.

    ``example_inputs`` is a batch shaped like the real inputs, on the model's device (its first
    item is used to trace and count). The classifier (``model.fc``) keeps its outputs; a model may also list layers
    torch-pruning must not touch in a ``pruning_ignored_layers()`` method (see ShuffleNetV2).
    ``importance="taylor"`` needs ``gradient_fn``, which is called (model in eval mode, grads
    zeroed) before each round that prunes and must leave the loss's gradients in ``.grad``.
    Returns ``{"macs_before", "macs_after", "params_before", "params_after", "steps", "history",
    "layers"}`` (and ``latency_ms_before``/``latency_ms_after`` for a latency target), where
    ``steps`` is the number of rounds, ``history`` their measurements and ``layers`` one row per
    Conv2d/Linear with its channels and MACs before and after.
    Raises ``ValueError`` if the target cannot be reached; the model is then partly pruned and
    should be discarded.
    """
    import torch_pruning as tp

    if target not in TARGETS:
        raise ValueError(f"prune target must be 'macs' or 'params' or 'latency', got {target!r}")
    if target == "latency":
        if latency_fn is None or latency_ms is None or not latency_ms > 0:
            raise ValueError("a latency target needs latency_fn and latency_ms > 0")
    elif not 0.0 < ratio <= 1.0:
        raise ValueError(f"prune ratio must be in (0, 1] (the fraction to keep), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
    imp = _importance(importance)
    if importance == "taylor" and gradient_fn is None:
        raise ValueError("importance 'taylor' ranks channels by weight x gradient: give gradient_fn")
    if importance == "bn_scale":
        _check_batchnorm(model)

    was_training = model.training
    # Tracing and counting run forward passes: in train mode they would overwrite the BN statistics.
    model.eval()
    layers_before = layer_table(model, example_inputs)
    now = {}

    def measure() -> float:
        now["macs"], now["params"] = _count(model, example_inputs)
        if target == "latency":
            now["latency_ms"] = float(latency_fn(model))
            return now["latency_ms"]
        return now[target]

    before = measure()
    start = dict(now)
    goal = latency_ms if target == "latency" else before * ratio
    with torch.no_grad():
        out_shape = model(example_inputs[:1]).shape
    ignored = [_classifier(model, example_inputs)]
    if hasattr(model, "pruning_ignored_layers"):
        ignored += list(model.pruning_ignored_layers())

    with torch.enable_grad():  # torch-pruning traces the graph through autograd
        pruner = tp.pruner.BasePruner(
            model, example_inputs[:1], importance=imp,
            global_pruning=global_pruning,
            pruning_ratio=_MAX_CHANNEL_RATIO, iterative_steps=_SUBSTEPS,  # many small steps; we stop early
            max_pruning_ratio=_MAX_LAYER_RATIO,
            round_to=round_to if round_to and round_to > 1 else None,
            ignored_layers=ignored,
        )

    def fail(value: float) -> ValueError:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        if target == "latency":
            where = (f"cannot prune to {latency_ms:g} ms: the latency stopped at {value:.3g} ms "
                     f"({100 * now['macs'] / start['macs']:.1f}% of the MACs)")
        else:
            where = f"cannot prune to {100 * ratio:g}% of the {target}: stopped at {100 * value / before:.1f}%"
        return ValueError(f"{where} after the full schedule (layers stop once {100 * _MAX_LAYER_RATIO:g}% of "
                          f"their channels are gone; the classifier and pruning_ignored_layers() are kept); the "
                          f"model was modified in place")

    value, history = before, []
    for k in range(1, iterative_steps + 1):
        budget = before * (goal / before) ** (k / iterative_steps) if goal < before else goal
        if value > budget and gradient_fn is not None and importance == "taylor":
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                gradient_fn(model)
            model.eval()
            missing = [n for n, m in model.named_modules()
                       if isinstance(m, (nn.Conv2d, nn.Linear)) and m.weight.grad is None and m not in ignored]
            if missing:
                raise ValueError(f"gradient_fn left no gradient on {missing[0]!r} ({len(missing)} layers)")
        while value > budget:
            if pruner.current_step >= _SUBSTEPS:
                raise fail(value)
            pruner.step()
            value = measure()
        if calib_fn is not None:
            calib_fn(model)
            model.eval()
        history.append({"round": k, **now})

    model.zero_grad(set_to_none=True)  # taylor's gradients belong to the weights before pruning
    with torch.no_grad():
        out = model(example_inputs[:1])
    if out.shape != out_shape:  # a user model whose classifier we did not recognise
        raise ValueError(f"pruning changed the output shape from {tuple(out_shape)} to {tuple(out.shape)}; "
                         "name the classifier `fc` or list it in `pruning_ignored_layers()`")
    layers_after = layer_table(model, example_inputs)
    model.train(was_training)
    result = {"target": target, "importance": importance,
              "macs_before": start["macs"], "macs_after": now["macs"],
              "params_before": start["params"], "params_after": now["params"],
              "steps": iterative_steps, "history": history,
              "layers": [{"name": name, "type": b["type"], "groups_after": layers_after[name]["groups"],
                          "in_before": b["in"], "in_after": layers_after[name]["in"],
                          "out_before": b["out"], "out_after": layers_after[name]["out"],
                          "macs_before": b["macs"], "macs_after": layers_after[name]["macs"]}
                         for name, b in layers_before.items()]}
    if target == "latency":
        result.update(latency_ms_target=latency_ms, latency_ms_before=start["latency_ms"],
                      latency_ms_after=now["latency_ms"])
    return result


def write_layer_report(layers: list[dict], directory: Path, title: str = "Pruned layers") -> tuple[Path, Path]:
    """``layers.json`` (the rows of ``prune_model(...)["layers"]``) and ``layers.md`` (a table of them)."""
    from compress.io import atomic_write_json, atomic_write_text

    def pct(after: int, before: int) -> str:
        return f"{100 * after / before:.0f}%" if before else "-"

    lines = [f"# {title}", "",
             "| layer | type | out channels | in channels | MACs before | MACs after | MACs kept |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in layers:
        lines.append(f"| `{r['name']}` | {r['type']} | {r['out_before']} -> {r['out_after']} | "
                     f"{r['in_before']} -> {r['in_after']} | {r['macs_before']:,} | {r['macs_after']:,} | "
                     f"{pct(r['macs_after'], r['macs_before'])} |")
    macs_before = sum(r["macs_before"] for r in layers)
    macs_after = sum(r["macs_after"] for r in layers)
    lines += [f"| **all conv/linear** | | | | {macs_before:,} | {macs_after:,} | {pct(macs_after, macs_before)} |",
              "", "MACs of one image through each layer (BatchNorm, activations and pooling not included).", ""]
    directory = Path(directory)
    return (atomic_write_json(directory / "layers.json", {"layers": layers}),
            atomic_write_text(directory / "layers.md", "\n".join(lines)))


# ----------------------------------------------------------------------------- stage

def _checkpoint(ctx, phase: str) -> Path | None:
    """Each training phase resumes from its own file (the pipeline deletes checkpoint-*.pt once done)."""
    if ctx.checkpoint is None or phase == "finetune":
        return ctx.checkpoint
    return ctx.checkpoint.with_name(f"{ctx.checkpoint.stem}-{phase}.pt")


def _train(cfg, ctx, model: nn.Module, teachers: list[nn.Module], epochs: int, phase: str,
           penalty: Callable[[nn.Module], torch.Tensor] | None = None) -> dict:
    """``epochs`` of the stage's distillation loss (method:, features: as in distill), plus ``penalty``."""
    from compress.losses import build_loss
    from compress.training import fit

    with build_loss(cfg, teachers, model, ctx.data) as kd_loss:
        return fit(model, ctx.data, cfg, epochs, device=ctx.device, teachers=teachers, kd_loss=kd_loss,
                   penalty=penalty, log=ctx.log, progress=ctx.progress,
                   desc=ctx.stage_name if phase == "finetune" else f"{ctx.stage_name} ({phase})",
                   checkpoint=_checkpoint(ctx, phase))


def _bn_scales(model: nn.Module) -> dict:
    scales = torch.cat([m.weight.detach().abs().flatten().cpu() for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine])
    return {"mean_abs": float(scales.mean()), "below_0.01": float((scales < 0.01).float().mean())}


def run(cfg, ctx):
    """Prune the parent to the stage's target, then fine-tune it with KD from its teacher."""
    from compress import distributed
    from compress.context import StageError
    from compress.losses import build_loss
    from compress.training import evaluate, recalibrate_bn

    parent = ctx.inputs[0]
    model = ctx.load_model(parent).to(ctx.device)
    teachers = [ctx.load_model(a).to(ctx.device).eval().requires_grad_(False) for a in ctx.teachers]
    split = "val" if ctx.data.num_val else "train"
    batch_size = cfg.batch_size or ctx.data.batch_size
    info: dict = {}

    if cfg.importance == "bn_scale":  # before a sparsity phase that would have nothing to push
        try:
            _check_batchnorm(model)
        except ValueError as exc:
            raise StageError(f"stage {ctx.stage_name!r}: {exc}") from None
    if cfg.sparsity is not None:  # network slimming: push the BN scales the network can spare towards 0
        strength = cfg.sparsity.strength
        scales = _bn_scales(model)
        _train(cfg, ctx, model, teachers, cfg.sparsity.epochs, "sparsity", penalty=lambda m: strength * bn_l1(m))
        info["sparsity"] = {"epochs": cfg.sparsity.epochs, "strength": strength, "bn_scales_before": scales,
                            "bn_scales_after": _bn_scales(model),
                            "accuracy": evaluate(model, ctx.data.eval_batches(split))}
        ctx.log(f"[{ctx.stage_name}] sparsity training: mean |BN scale| {scales['mean_abs']:.3f} -> "
                f"{info['sparsity']['bn_scales_after']['mean_abs']:.3f}; {split} accuracy "
                f"{info['sparsity']['accuracy']:.2f}%")

    rounds = itertools.count(1)

    def after_round(m: nn.Module) -> None:
        k = next(rounds)
        recalibrate_bn(m, ctx.data.train_batches(0, augment=False))
        if cfg.finetune_between_epochs and k < cfg.iterative_steps:
            _train(cfg, ctx, m, teachers, cfg.finetune_between_epochs, f"round{k}")

    taylor_calls = itertools.count()

    def taylor_gradients(m: nn.Module) -> None:
        # The logit terms of the stage's loss (a feature term would bring untrained adapters).
        loss_cfg = cfg.model_copy(update={"features": None})
        batches = ctx.data.train_batches(next(taylor_calls), batch_size, augment=False)
        with build_loss(loss_cfg, teachers, m, ctx.data) as loss_fn:
            for x, y in itertools.islice(batches, cfg.taylor_batches):
                logits = m(x)
                if teachers:
                    with torch.no_grad():
                        t_logits = [t(x) for t in teachers]
                    loss = loss_fn(logits, t_logits, y)
                else:
                    loss = F.cross_entropy(logits, y)
                loss.backward()

    latency_fn = None
    if cfg.target_latency_ms is not None:
        target, ratio = "latency", 1.0
        where = f"{cfg.latency_runtime}, batch {cfg.latency_batch}, median of {_LATENCY_ITERS} runs"
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
        more = f" (latency on {where})" if target == "latency" else ""
        raise StageError(f"stage {ctx.stage_name!r}: {exc}{more}") from None
    layers = info.pop("layers")
    report = (ctx.stage_dir / "layers.json", ctx.stage_dir / "layers.md")
    if distributed.is_main():  # under torchrun every process pruned alike; rank 0 writes
        write_layer_report(layers, ctx.stage_dir, f"{ctx.stage_name}: pruned layers ({cfg.importance}, "
                                                  f"{info['macs_after'] / info['macs_before']:.0%} of the MACs)")
    if target == "latency":
        info["latency"] = where
        ctx.log(f"[{ctx.stage_name}] latency {info['latency_ms_before']:.3f} -> {info['latency_ms_after']:.3f} ms "
                f"(target {cfg.target_latency_ms:g} ms; {where})")
    info["accuracy_before_finetune"] = evaluate(model, ctx.data.eval_batches(split))
    ctx.log(f"[{ctx.stage_name}] MACs {info['macs_before']:,} -> {info['macs_after']:,} "
            f"({100 * info['macs_after'] / info['macs_before']:.1f}%), params {info['params_before']:,} -> "
            f"{info['params_after']:,}; {split} accuracy before fine-tuning {info['accuracy_before_finetune']:.2f}%")
    metrics = {"best_accuracy": info["accuracy_before_finetune"], "best_split": split}
    if cfg.finetune_epochs:
        metrics = _train(cfg, ctx, model, teachers, cfg.finetune_epochs, "finetune")
    metrics.update(prune=info, teachers=[a.name for a in ctx.teachers])
    artifact = ctx.save_model(model, parent.model, "prune", metrics, parent=parent.name)
    artifact.files["layers"], artifact.files["layers_json"] = str(report[1]), str(report[0])  # as quantize names them
    return artifact
