"""Structured channel pruning with Torch-Pruning's dependency graph.

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

from typing import Callable

import torch
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


def check_batchnorm(model: nn.Module) -> None:
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
        check_batchnorm(model)

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


def bn_scales(model: nn.Module) -> dict:
    """Mean |BatchNorm scale| and the share below 0.01: how far a sparsity phase pushed them."""
    scales = torch.cat([m.weight.detach().abs().flatten().cpu() for m in model.modules()
                        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine])
    return {"mean_abs": float(scales.mean()), "below_0.01": float((scales < 0.01).float().mean())}
