"""The one training loop behind `train`, `distill` and the fine-tuning after `prune`.

nanoGPT-style: one readable loop. The whole dataset sits on the device and arrives in
augmented batches (compress.data); the loop adds the optimizer, the schedule, mixed
precision on CUDA, distillation from frozen teachers, and keeps the weights of the epoch
with the best validation accuracy. Running sums stay on the device; the host reads them
only when the progress bar refreshes, so the step has no per-step sync.
"""

from __future__ import annotations

import copy
import math
import time
from contextlib import nullcontext
from typing import Callable

import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from compress.config import OptimConfig

REFRESH_EVERY = 20  # steps between progress-bar updates (each update syncs the device)


def make_optimizer(model: nn.Module, opts: OptimConfig, extra: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (the usual ResNet/MobileNet recipe).
    params = [p for p in [*model.parameters(), *extra] if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr)
    return torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.momentum > 0)


def make_scheduler(optimizer, opts: OptimConfig, total_steps: int, steps_per_epoch: int):
    if opts.schedule == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=max(total_steps, 1),
                                                   pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    warmup = int(opts.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if opts.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def autocast_for(device: torch.device, enabled: bool):
    """bf16 autocast where the GPU supports it, else fp16 (with a GradScaler); nothing on CPU."""
    if device.type != "cuda" or not enabled:
        return nullcontext(), None
    if torch.cuda.is_bf16_supported():
        return torch.autocast("cuda", dtype=torch.bfloat16), None
    return torch.autocast("cuda", dtype=torch.float16), torch.amp.GradScaler("cuda")


@torch.no_grad()
def evaluate(model: nn.Module, batches) -> float:
    """Top-1 accuracy (%) of a PyTorch model over (images, labels) batches."""
    was_training = model.training
    model.eval()
    correct = total = 0
    for x, y in batches:
        correct += (model(x).argmax(1) == y).sum()
        total += y.numel()
    model.train(was_training)
    return float(correct) * 100.0 / max(total, 1)


@torch.no_grad()
def recalibrate_bn(model: nn.Module, batches, max_batches: int = 20) -> None:
    """Re-estimate BatchNorm running statistics from scratch (a cumulative average over the batches).

    After pruning, the kept channels' statistics no longer match what the thinner layers
    before them produce; recalibrating lifts a freshly pruned model from near chance to a
    sensible start for fine-tuning, for the cost of a few forward passes.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    was_training = model.training
    model.train()
    for i, (x, _) in enumerate(batches):
        if i >= max_batches:
            break
        model(x)
    for m, momentum in zip(norms, momenta):
        m.momentum = momentum
    model.train(was_training)


def fit(model: nn.Module, data, opts: OptimConfig, epochs: int, *, device: torch.device,
        teachers: list[nn.Module] = (), kd_loss: Callable | None = None,
        log: Callable[[str], None] = print, progress: bool = True, desc: str = "train") -> dict:
    """Train `model` in place for `epochs`; returns metrics and leaves the best-on-validation weights loaded.

    With `teachers`, the loss is `kd_loss(student_logits, [teacher_logits...], labels)`; the
    teachers run frozen, in eval mode, without autograd.
    """
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    for t in teachers:
        t.to(device).eval().requires_grad_(False)
    batch_size = opts.batch_size or data.batch_size
    steps_per_epoch = data.steps_per_epoch(batch_size)
    # A distillation loss may learn too (e.g. adapters between feature maps): train it with the student.
    loss_params = list(kd_loss.parameters()) if isinstance(kd_loss, nn.Module) else []
    if loss_params:
        kd_loss.to(device).train()
    optimizer = make_optimizer(model, opts, loss_params)
    scheduler = make_scheduler(optimizer, opts, epochs * steps_per_epoch, steps_per_epoch)
    autocast, scaler = autocast_for(device, opts.amp)
    has_val = data.num_val > 0

    best_acc, best_epoch, best_state = -1.0, -1, None
    history = []
    images_seen, train_time = 0, 0.0
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[info]}"),
               TimeElapsedColumn(), TimeRemainingColumn()]
    with Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(desc, total=epochs * steps_per_epoch, info="")
        for epoch in range(epochs):
            model.train()
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            t0 = time.perf_counter()
            for step, (x, y) in enumerate(data.train_batches(epoch, batch_size)):
                if device.type == "cuda":
                    x = x.contiguous(memory_format=torch.channels_last)
                with autocast:
                    logits = model(x)
                    if teachers:
                        with torch.no_grad():
                            t_logits = [t(x) for t in teachers]
                        loss = kd_loss(logits, t_logits, y)
                    else:
                        loss = F.cross_entropy(logits.float(), y, label_smoothing=opts.label_smoothing)
                optimizer.zero_grad(set_to_none=True)
                if scaler is not None:
                    scaler.scale(loss).backward()
                    scaler.step(optimizer)
                    scaler.update()
                else:
                    loss.backward()
                    optimizer.step()
                scheduler.step()
                loss_sum += loss.detach() * y.numel()
                correct += (logits.detach().argmax(1) == y).sum()
                seen += y.numel()
                if (step + 1) % REFRESH_EVERY == 0 or step + 1 == steps_per_epoch:
                    rate = seen / max(time.perf_counter() - t0, 1e-9)
                    info = (f"epoch {epoch + 1}/{epochs}  loss {loss_sum.item() / seen:.3f}  "
                            f"acc {correct.item() * 100 / seen:.1f}%  {rate:,.0f} img/s")
                    bar.update(task, completed=epoch * steps_per_epoch + step + 1, info=info)
            epoch_time = time.perf_counter() - t0
            images_seen += seen
            train_time += epoch_time
            split = "val" if has_val else "train"
            acc = evaluate(model, data.eval_batches(split))
            record = {"epoch": epoch + 1, "loss": loss_sum.item() / max(seen, 1),
                      "train_accuracy": correct.item() * 100 / max(seen, 1), f"{split}_accuracy": acc,
                      "seconds": round(epoch_time, 2), "images_per_s": round(seen / max(epoch_time, 1e-9), 1)}
            if not math.isfinite(record["loss"]):
                raise FloatingPointError(f"{desc}: the training loss became {record['loss']} in epoch {epoch + 1}; "
                                         f"lower the learning rate (lr: {opts.lr})")
            history.append(record)
            log(f"{desc}: epoch {epoch + 1}/{epochs} loss {record['loss']:.4f} "
                f"train {record['train_accuracy']:.2f}% {split} {acc:.2f}% ({record['images_per_s']:,.0f} img/s)")
            if acc > best_acc:
                best_acc, best_epoch = acc, epoch + 1
                best_state = copy.deepcopy({k: v.detach().cpu() for k, v in model.state_dict().items()})
    if best_state is not None:
        model.load_state_dict(best_state)
    model.to(memory_format=torch.contiguous_format)
    return {"best_accuracy": best_acc, "best_split": "val" if has_val else "train", "best_epoch": best_epoch,
            "epochs": epochs, "train_seconds": round(train_time, 2),
            "train_images_per_s": round(images_seen / max(train_time, 1e-9), 1), "history": history}
