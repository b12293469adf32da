"""Prune stage: structured channel pruning with Torch-Pruning's dependency graph.

From "DepGraph: Towards Any Structural Pruning" (Fang et al., CVPR 2023). Coupled layers
(a residual sum, a depthwise conv and its producer, a squeeze-excite gate) are grouped and
lose the same channels together, so the pruned model is a smaller dense network, not a
masked one. By default every layer loses the same share of its channels, ranked by weight
magnitude within the layer: ranking globally by raw magnitude (`global_pruning`) compares
layers of different scales and, on our Fashion-MNIST students at half the MACs, emptied
whole useful layers (accuracy at chance before fine-tuning, against ~50-60% per layer).

The target is a measured budget (keep ``ratio`` of the MACs or parameters), not a channel
ratio: channel ratio and MACs are related only roughly (MACs fall about quadratically, less
where layers are protected). So we let torch-pruning take many small global steps and stop
as soon as the measured count is under budget, in ``iterative_steps`` rounds whose budgets
shrink geometrically; ``calib_fn`` runs after each round (BN recalibration, a short
fine-tune) so later rounds rank channels of a model that has recovered.

Pitfall (Torch-Pruning's own): a pruned model no longer matches its class's constructor.
Save it with ``compress.io.save_model``, which records every layer's shape.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

# The pruner walks the channel ratio 0 -> _MAX_CHANNEL_RATIO in this many steps, so one step
# removes ~1% of the channels and the target is met closely (within a few % on thin models,
# where round_to makes a 16-channel layer drop to 8 at once).
_SUBSTEPS = 100
_MAX_CHANNEL_RATIO = 0.95
# A layer stops being pruned once it has lost this fraction of its channels (and is never emptied).
_MAX_LAYER_RATIO = 0.9


def _importance(name: str):
    import torch_pruning as tp

    factories = {
        "l1": lambda: tp.importance.GroupMagnitudeImportance(p=1),
        "l2": lambda: tp.importance.GroupMagnitudeImportance(p=2),
        "lamp": lambda: tp.importance.LAMPImportance(p=2),
        "fpgm": lambda: tp.importance.FPGMImportance(p=2),
        "random": lambda: tp.importance.RandomImportance(),
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


def prune_model(model: nn.Module, example_inputs: torch.Tensor, *,
                target: str = "macs",           # what the budget counts: "macs" or "params"
                ratio: float = 0.5,             # keep this fraction of it (0.5: half the MACs remain)
                importance: str = "l2",         # channel score: "l1", "l2", "lamp", "fpgm", "random"
                round_to: int = 8,              # pruned layers keep a multiple of this many channels
                iterative_steps: int = 5,       # rounds, each followed by calib_fn
                global_pruning: bool = False,   # rank channels across layers (True) or prune each layer alike
                calib_fn: Callable[[nn.Module], None] | None = None) -> dict:
    """Prune ``model`` in place until its MACs (or params) are at most ``ratio`` of what they were.

    ``example_inputs`` is a batch shaped like the real inputs, on the model's device (its first
    item is used to trace and count). The classifier (``model.fc``) keeps its outputs; a model may also list layers
    torch-pruning must not touch in a ``pruning_ignored_layers()`` method (see ShuffleNetV2).
    Returns ``{"macs_before", "macs_after", "params_before", "params_after", "steps", "history"}``
    where ``steps`` is the number of rounds and ``history`` their measured MACs and params.
    Raises ``ValueError`` if the target cannot be reached; the model is then partly pruned and
    should be discarded.
    """
    import torch_pruning as tp

    if target not in ("macs", "params"):
        raise ValueError(f"prune target must be 'macs' or 'params', got {target!r}")
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"prune ratio must be in (0, 1] (the fraction to keep), got {ratio}")
    if iterative_steps < 1:
        raise ValueError(f"iterative_steps must be >= 1, got {iterative_steps}")
    imp = _importance(importance)

    was_training = model.training
    # Tracing and counting run forward passes: in train mode they would overwrite the BN statistics.
    model.eval()
    macs_before, params_before = _count(model, example_inputs)
    before = macs_before if target == "macs" else params_before
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
    macs, params = macs_before, params_before
    history = []
    for k in range(1, iterative_steps + 1):
        budget = before * ratio ** (k / iterative_steps)
        while (now := macs if target == "macs" else params) > budget:
            if pruner.current_step >= _SUBSTEPS:
                model.train(was_training)
                raise ValueError(
                    f"cannot prune to {100 * ratio:g}% of the {target}: stopped at {100 * now / before:.1f}% "
                    f"after the full schedule (layers stop once {100 * _MAX_LAYER_RATIO:g}% of their channels are "
                    f"gone; the classifier and pruning_ignored_layers() are kept); the model was modified in place")
            pruner.step()
            macs, params = _count(model, example_inputs)
        if calib_fn is not None:
            calib_fn(model)
            model.eval()
        history.append({"round": k, "macs": macs, "params": params})

    with torch.no_grad():
        out = model(example_inputs[:1])
    if out.shape != out_shape:  # a user model whose classifier we did not recognise
        raise ValueError(f"pruning changed the output shape from {tuple(out_shape)} to {tuple(out.shape)}; "
                         "name the classifier `fc` or list it in `pruning_ignored_layers()`")
    model.train(was_training)
    return {"macs_before": macs_before, "macs_after": macs, "params_before": params_before,
            "params_after": params, "steps": iterative_steps, "history": history}


# ----------------------------------------------------------------------------- stage

def run(cfg, ctx):
    """Prune the parent to the MACs (or params) budget, then fine-tune it with KD from its teacher."""
    from compress.context import StageError
    from compress.losses import build_loss
    from compress.training import evaluate, fit, recalibrate_bn

    parent = ctx.inputs[0]
    model = ctx.load_model(parent).to(ctx.device)
    target, ratio = ("macs", cfg.target_macs) if cfg.target_macs is not None else ("params", cfg.target_params)
    try:
        info = prune_model(model, torch.zeros(1, *ctx.input_shape(), device=ctx.device), target=target,
                           ratio=ratio, importance=cfg.importance, round_to=cfg.round_to,
                           iterative_steps=cfg.iterative_steps, global_pruning=cfg.global_pruning,
                           calib_fn=lambda m: recalibrate_bn(m, ctx.data.train_batches(0, augment=False)))
    except ValueError as exc:
        raise StageError(f"stage {ctx.stage_name!r}: {exc}") from None
    split = "val" if ctx.data.num_val else "train"
    info["accuracy_before_finetune"] = evaluate(model, ctx.data.eval_batches(split))
    ctx.log(f"[{ctx.stage_name}] {target} {info[f'{target}_before']:,} -> {info[f'{target}_after']:,} "
            f"({100 * info[f'{target}_after'] / info[f'{target}_before']:.1f}%); {split} accuracy before "
            f"fine-tuning {info['accuracy_before_finetune']:.2f}%")
    metrics = {"best_accuracy": info["accuracy_before_finetune"], "best_split": split}
    if cfg.finetune_epochs:
        teachers = [ctx.load_model(a) for a in ctx.teachers]
        with build_loss(cfg, teachers, model, ctx.data) as kd_loss:  # method:, features: as in distill
            metrics = fit(model, ctx.data, cfg, cfg.finetune_epochs, device=ctx.device, teachers=teachers,
                          kd_loss=kd_loss, log=ctx.log, progress=ctx.progress, desc=ctx.stage_name,
                          checkpoint=ctx.checkpoint)
    metrics.update(prune=info, teachers=[a.name for a in ctx.teachers])
    return ctx.save_model(model, parent.model, "prune", metrics, parent=parent.name)
