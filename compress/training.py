"""The one training loop behind `train`, `distill` and the fine-tuning after `prune`.

nanoGPT-style: one readable loop. Batches arrive augmented and normalized on the device
(compress.data); the loop adds mixup/CutMix, the optimizer, the schedule, mixed precision
and channels-last (on CUDA; on a CPU where a probe finds them faster: compress.fastpath),
distillation from frozen teachers (under inference mode), an
optional EMA of the weights and torch.compile, DDP under torchrun (compress.distributed),
and keeps the weights (EMA ones, if on) of the epoch with the best validation accuracy.
A step never waits for the host: running sums stay on the device, a NaN or inf loss is
dropped by the fused optimizer reading a device flag, and the host looks at the device only
when the progress bar refreshes (every REFRESH_EVERY steps).

Nothing lost (nanoGPT's resume, made exact). With `checkpoint=`, every epoch ends with one
self-describing file: model, optimizer, schedule, AMP scaler, the best weights so far, the
history, and the python/numpy/torch/CUDA generator states; the data order is a function of
(seed, epoch). A run killed at any point and started again continues from the last
checkpoint and, on a CPU with the same seed, ends with the same weights bit for bit.
SIGINT/SIGTERM finish the current step and checkpoint it before stopping (`Interrupted`).

Nothing trusted blindly. A non-finite loss skips its optimizer step; `nonfinite_patience`
of them in a row (noticed at the next refresh) roll training back to the last good state
(the start of the epoch) with the learning rate halved; after `max_rollbacks` the stage fails (`StageError`). Non-finite
weights are never checkpointed, kept as best, or saved.
"""

from __future__ import annotations

import io
import itertools
import math
import os
import random
import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from torch import nn

from compress import distributed, fastpath
from compress.config import OptimConfig
from compress.context import StageError
from compress.data.augment import Mixer
from compress.ema import EMA
from compress.io import CheckpointError, atomic_write_bytes, nonfinite_tensors, safe_load

REFRESH_EVERY = 20          # steps between progress-bar updates (each update syncs the device)
CHECKPOINT_FORMAT = "compress.checkpoint/1"
NONFINITE_PATIENCE = 3      # non-finite losses in a row before rolling back to the last good state
MAX_ROLLBACKS = 3           # rollbacks (each halving the learning rate) before the stage gives up


def make_optimizer(model: nn.Module, opts: OptimConfig, extra: list[nn.Parameter] = ()) -> torch.optim.Optimizer:
    # No weight decay on biases and norm parameters (the usual ResNet/MobileNet recipe).
    params = [p for p in [*model.parameters(), *extra] if p.requires_grad]
    decay = [p for p in params if p.ndim > 1]
    no_decay = [p for p in params if p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": opts.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    # Fused kernels read `optimizer.found_inf` (a device flag) and skip the step themselves, so a
    # non-finite loss is dropped without the host ever reading it (see `fit`).
    if opts.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=opts.lr, fused=True)
    optimizer = torch.optim.SGD(groups, lr=opts.lr, momentum=opts.momentum, nesterov=opts.momentum > 0, fused=True)
    if opts.momentum > 0:
        # Fused SGD allocates its momentum buffers uninitialised on the first step and fills them
        # then; a skipped first step would leave garbage behind. Zero buffers give the same first
        # step (buf = 0 * momentum + grad = grad) and nothing undefined.
        for p in params:
            optimizer.state[p]["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.preserve_format)
    return optimizer


def make_scheduler(optimizer, opts: OptimConfig, total_steps: int, steps_per_epoch: int):
    if opts.schedule == "onecycle":
        # warmup_epochs sets the length of its rise from lr/10 (default: a quarter of the steps). OneCycleLR
        # divides by zero when a phase is exactly one step long (e.g. 4 steps at 25%): keep each >= 2 steps.
        rise = opts.warmup_epochs * steps_per_epoch or 0.25 * total_steps
        pct = min(max(rise, 2.0), total_steps - 1.0) / total_steps if total_steps > 2 else 0.25
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=opts.lr, total_steps=max(total_steps, 1),
                                                   pct_start=pct, div_factor=10.0, final_div_factor=100.0)
    warmup = int(opts.warmup_epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if opts.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total_steps - warmup)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


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


def compute_loss(net: nn.Module, x: torch.Tensor, y: torch.Tensor, *, teachers: list[nn.Module] = (),
                 kd_loss: Callable | None = None, label_smoothing: float = 0.0,
                 penalty: Callable[[nn.Module], torch.Tensor] | None = None,
                 model: nn.Module | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, logits) of one batch: `kd_loss` against the frozen teachers, or cross-entropy without them,
    plus `penalty(model)`. The one loss of `fit` and of prune's gradient pass."""
    logits = net(x)
    if teachers:
        with torch.inference_mode():  # no autograd bookkeeping at all for the teachers
            t_logits = [t(x) for t in teachers]
        # Outside inference mode, as normal tensors: the loss may save them for its backward.
        loss = kd_loss(logits, [t.clone() for t in t_logits], y)
    else:
        loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
    if penalty is not None:
        loss = loss + penalty(net if model is None else model)
    return loss, logits


def gradient_pass(model: nn.Module, batches, *, teachers: list[nn.Module] = (),
                  kd_loss: Callable | None = None) -> None:
    """Accumulate the loss's gradients over `batches` in `.grad`, without a step (prune's Taylor importance)."""
    for x, y in batches:
        loss, _ = compute_loss(model, x, y, teachers=teachers, kd_loss=kd_loss)
        loss.backward()


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped training after a step; the checkpoint holds everything up to it."""


# ----------------------------------------------------------------------------- exact resume

def rng_state() -> dict:
    """Python, numpy, torch and CUDA generator states, as types ``torch.load(weights_only=True)`` accepts."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(gauss)),
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


@dataclass
class _Progress:
    """Where training stands; with the model, optimizer, schedule and RNG it is a checkpoint."""

    epoch: int = 0                  # epochs finished
    step: int = 0                   # steps finished in the current epoch
    seen: int = 0                   # images through the current epoch's steps, taken or skipped
    # Running sums of the current epoch, kept on the device (see _DEVICE_FIELDS): the host reads
    # them when the progress bar refreshes, never per step.
    loss_sum: torch.Tensor | float = 0.0
    correct: torch.Tensor | int = 0
    counted: torch.Tensor | int = 0     # images of the steps taken (finite loss)
    skipped: torch.Tensor | int = 0     # non-finite steps skipped in the current epoch
    streak: torch.Tensor | int = 0      # non-finite steps in a row, now
    tripped: torch.Tensor | int = -1    # the step at which `streak` first reached the patience (-1: not yet)
    epoch_seconds: float = 0.0      # time spent in the current epoch before a stop
    best_accuracy: float = -1.0
    best_epoch: int = -1
    best_state: dict | None = None  # CPU copy of the best weights so far
    history: list = field(default_factory=list)
    images_seen: int = 0
    train_seconds: float = 0.0
    rollbacks: int = 0              # each halved the learning rate


_DEVICE_FIELDS = {"loss_sum": torch.float32, "correct": torch.long, "counted": torch.long, "skipped": torch.long,
                  "streak": torch.long, "tripped": torch.long}


class _Trainer:
    """One fit: its mutable objects (saved and restored together) and the loop's steps as methods.

    `fit` is the loop; each method is one idea of it. `optimizer_step` is the one place that knows
    about the AMP scaler (a GradScaler that is a no-op when off, as in nanoGPT), the fused
    optimizer's device flag and DDP.
    """

    def __init__(self, model: nn.Module, data, opts: OptimConfig, epochs: int, *, device: torch.device,
                 teachers, kd_loss, penalty, log, desc: str, checkpoint, nonfinite_patience: int, max_rollbacks: int):
        self.model, self.data, self.opts, self.epochs, self.device = model, data, opts, epochs, device
        self.teachers, self.kd_loss, self.penalty, self.log, self.desc = list(teachers), kd_loss, penalty, log, desc
        self.checkpoint = Path(checkpoint) if checkpoint is not None else None
        self.patience, self.max_rollbacks = nonfinite_patience, max_rollbacks
        model.to(device)
        self.batch_size = opts.batch_size or data.batch_size
        self.steps_per_epoch = data.steps_per_epoch(self.batch_size)
        # Memory format and autocast (compress.fastpath: measured per model on a CPU; channels-last and bf16,
        # or fp16 with a working GradScaler, on CUDA). Under DDP rank 0 decides for all; a fit outside a
        # data-parallel stage (e.g. QAT, in rank 0 alone) decides alone: a broadcast there would cross another.
        if distributed.data_parallel():
            self.fast = distributed.broadcast(self.choose_fast_path() if distributed.rank() == 0 else None)
        else:
            self.fast = self.choose_fast_path()
        log(f"{desc}: {self.fast.mode} ({self.fast.reason})")
        self.fast.model(model)
        for t in self.teachers:  # the teachers' forward runs under the same autocast, in the same layout
            self.fast.model(t.to(device).eval().requires_grad_(False))
        # A distillation loss may learn too (e.g. adapters between feature maps): train it with the student.
        self.loss_params = list(kd_loss.parameters()) if isinstance(kd_loss, nn.Module) else []
        if self.loss_params:
            kd_loss.to(device).train()
        self.optimizer = make_optimizer(model, opts, self.loss_params)
        self.scheduler = make_scheduler(self.optimizer, opts, epochs * self.steps_per_epoch, self.steps_per_epoch)
        self.autocast, self.scaler = self.fast.context(), self.fast.scaler()
        self.split = "val" if data.num_val > 0 else "train"
        self.ema = EMA(model, opts.ema_decay) if opts.ema_decay else None
        self.scored = self.ema.module if self.ema is not None else model  # evaluated, kept as best, returned
        self.mix = Mixer.from_config(opts, data.num_classes, data.seed)    # mixup / cutmix, None when off
        # Under torchrun (compress.distributed): DDP averages the gradients; every process trains on its
        # slice of each batch, and only rank 0 writes the checkpoint.
        self.ddp, self.rank, self.world = distributed.data_parallel(), distributed.rank(), distributed.world()
        self.net = model
        if self.ddp:
            self.net = nn.parallel.DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None)
        if opts.compile:  # the training forward only; evaluation and the saved weights use `model` itself
            self.net = torch.compile(self.net)
        self.prog = self.fresh_sums(_Progress())
        self.good = self.snapshot()  # the last good state: where a rollback returns to

    # --------------------------------------------------------------------- one step

    def batches(self, epoch: int):
        """(step, images, targets) of an epoch from where it stands: mixed, this process's slice, laid out."""
        # The order is a function of (seed, epoch): a resumed epoch skips the steps already done. Under DDP each
        # process reads only its slice of a batch (all of it when mixing pairs images across slices).
        shard = (self.rank, self.world) if self.ddp and self.mix is None else None
        batches = itertools.islice(self.data.train_batches(epoch, self.batch_size, shard=shard), self.prog.step, None)
        for step, (x, y) in enumerate(batches, start=self.prog.step):
            if self.mix is not None:  # y becomes (B, K) mixed targets; the teachers see the mixed images too
                x, y = self.mix(x, y, epoch, step)
            if self.ddp and shard is None:  # this process's slice; the slices of all processes make up the batch
                x, y = x.tensor_split(self.world)[self.rank], y.tensor_split(self.world)[self.rank]
            yield step, self.fast.input(x), y

    def loss(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(loss, student logits) of one batch, under autocast."""
        with self.autocast:
            return compute_loss(self.net, x, y, teachers=self.teachers, kd_loss=self.kd_loss,
                                label_smoothing=self.opts.label_smoothing, penalty=self.penalty, model=self.model)

    def optimizer_step(self, loss: torch.Tensor) -> torch.Tensor:
        """Backward, step, EMA, schedule; returns the device flag of a non-finite loss (its step skipped).

        The step of a NaN/inf loss is skipped without asking the host: the fused optimizer reads
        `found_inf` on the device (GradScaler does the same with its own flag under fp16 autocast).
        """
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        bad = ~torch.isfinite(loss.detach())
        if self.ddp:  # one process's NaN poisons the averaged gradients: all skip together
            bad = distributed.all_reduce_(bad.to(torch.uint8), "max").bool()
            for p in self.loss_params:  # a loss's own weights (adapters) are not in the DDP module
                if p.grad is not None:
                    distributed.all_reduce_(p.grad).div_(self.world)
        if not self.scaler.is_enabled():
            self.optimizer.found_inf = bad.float().reshape(1)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.found_inf = None
        if self.ema is not None:  # also after a skipped step: averaging unmoved weights once more is harmless
            self.ema.update(self.model)
        self.scheduler.step()  # the schedule counts steps, taken or skipped
        return bad

    def accumulate(self, step: int, loss: torch.Tensor, logits: torch.Tensor, y: torch.Tensor,
                   bad: torch.Tensor) -> None:
        """Add a step to the epoch's running sums, on the device (the host reads them at a refresh)."""
        p, n = self.prog, y.shape[0]
        p.loss_sum += torch.where(bad, 0.0, loss.detach().float() * n)
        p.correct += (logits.detach().argmax(1) == (y.argmax(1) if y.ndim > 1 else y)).sum() * ~bad
        p.counted += n * ~bad
        p.skipped += bad
        p.streak = (p.streak + 1) * bad
        p.tripped = torch.where((p.tripped < 0) & (p.streak >= self.patience), step, p.tripped)
        p.seen += n
        p.step = step + 1

    def progress_info(self, epoch: int, t0: float) -> str:
        """The progress bar's text (reads the device)."""
        p = self.prog
        rate, counted = p.seen / max(time.perf_counter() - t0, 1e-9), max(int(p.counted), 1)
        return (f"epoch {epoch + 1}/{self.epochs}  loss {p.loss_sum.item() / counted:.3f}  "
                f"acc {p.correct.item() * 100 / counted:.1f}%  {rate:,.0f} img/s")

    # --------------------------------------------------------------------- one epoch

    def end_epoch(self, epoch: int, t0: float) -> None:
        """Evaluate, record and log the epoch, keep the best weights, checkpoint."""
        p, split = self.prog, self.split
        epoch_time = time.perf_counter() - t0
        with self.fast.context():
            acc = evaluate(self.scored, ((self.fast.input(x), y) for x, y in self.data.eval_batches(split)))
        sums = torch.stack([p.loss_sum.double(), p.correct.double(), p.counted.double(),
                            torch.tensor(float(p.seen), dtype=torch.float64, device=self.device)])
        loss_sum, correct, counted, seen = distributed.all_reduce_(sums).tolist()  # over processes
        counted, seen, n_skipped = max(counted, 1), int(seen), int(p.skipped)
        record = {"epoch": epoch + 1, "loss": loss_sum / counted,
                  "train_accuracy": correct * 100 / counted, f"{split}_accuracy": acc,
                  "seconds": round(epoch_time, 2), "images_per_s": round(seen / max(epoch_time, 1e-9), 1),
                  "skipped_steps": n_skipped}
        p.history.append(record)
        skipped = f", {n_skipped} non-finite steps skipped" if n_skipped else ""
        self.log(f"{self.desc}: epoch {epoch + 1}/{self.epochs} loss {record['loss']:.4f} "
                 f"train {record['train_accuracy']:.2f}% {split} {acc:.2f}% ({record['images_per_s']:,.0f} img/s)"
                 f"{skipped}")
        if acc > p.best_accuracy:
            p.best_accuracy, p.best_epoch = acc, epoch + 1
            p.best_state = {k: v.detach().to("cpu", copy=True) for k, v in self.scored.state_dict().items()}
        p.images_seen += seen
        p.train_seconds += epoch_time
        p.epoch, p.step = epoch + 1, 0
        self.fresh_sums(p)
        self.save()

    def fresh_sums(self, p: _Progress) -> _Progress:
        for name, dtype in _DEVICE_FIELDS.items():
            setattr(p, name, torch.full((), -1 if name == "tripped" else 0, device=self.device, dtype=dtype))
        p.seen = 0
        p.epoch_seconds = 0.0
        return p

    def finish(self) -> dict:
        """Load the best weights; the metrics of the whole fit."""
        p = self.prog
        if p.best_state is not None:
            self.model.load_state_dict(p.best_state)
        for m in (self.model, *self.teachers):  # hand back plain NCHW modules, whatever the fast path did
            m.to(memory_format=torch.contiguous_format)
        return {"best_accuracy": p.best_accuracy, "best_split": self.split, "best_epoch": p.best_epoch,
                "epochs": self.epochs, "train_seconds": round(p.train_seconds, 2),
                "train_images_per_s": round(p.images_seen / max(p.train_seconds, 1e-9), 1),
                "rollbacks": p.rollbacks, "fast_path": self.fast.record(), "history": p.history}

    # --------------------------------------------------------------------- checkpoints, rollback, stop

    def snapshot(self) -> bytes:
        """Everything needed to continue exactly here, serialized: the same bytes go to disk."""
        state = {"format": CHECKPOINT_FORMAT,
                 "model": self.model.state_dict(),
                 "optimizer": self.optimizer.state_dict(),
                 "scheduler": self.scheduler.state_dict(),
                 "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
                 "kd_loss": self.kd_loss.state_dict() if isinstance(self.kd_loss, nn.Module) else None,
                 "ema": self.ema.state_dict() if self.ema is not None else None,
                 "rng": rng_state(),
                 "progress": asdict(self.prog),
                 "fast_path": self.fast.record()}
        buf = io.BytesIO()
        torch.save(state, buf)
        return buf.getvalue()

    def restore(self, state: dict) -> None:
        if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
            raise CheckpointError(f"not a {CHECKPOINT_FORMAT} file")
        own = self.model.state_dict()
        saved = state["model"]
        if set(saved) != set(own) or any(saved[k].shape != own[k].shape for k in own):
            raise CheckpointError("its weights do not fit this model")
        if self.ema is not None and state.get("ema") is None:
            raise CheckpointError("it has no moving average of the weights (ema_decay)")
        self.model.load_state_dict(saved)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        if self.scaler.is_enabled() and state["scaler"]:
            self.scaler.load_state_dict(state["scaler"])
        if isinstance(self.kd_loss, nn.Module) and state["kd_loss"] is not None:
            self.kd_loss.load_state_dict(state["kd_loss"])
        if self.ema is not None:
            self.ema.load_state_dict(state["ema"])
        set_rng_state(state["rng"])
        progress = _Progress(**state["progress"])
        for name, dtype in _DEVICE_FIELDS.items():
            setattr(progress, name, torch.as_tensor(getattr(progress, name), dtype=dtype).to(self.device))
        self.prog = progress

    def choose_fast_path(self) -> fastpath.FastPath:
        """The config's `cpu_fast_path`; under `auto`, a fit resuming a checkpoint keeps the choice it started
        with (a probe now, e.g. after the cache was deleted, could pick another, and resume would not be exact)."""
        opts, model = self.opts, self.model
        if opts.cpu_fast_path == "auto" and self.device.type == "cpu":
            try:
                state = self.saved_state()
                if state is None:
                    raise KeyError("no checkpoint")
                own, saved = model.state_dict(), state["model"]
                if set(saved) == set(own) and all(saved[k].shape == own[k].shape for k in own):
                    return fastpath.FastPath(**{k: v for k, v in state["fast_path"].items() if k != "mode"})
            except (CheckpointError, AttributeError, KeyError, RuntimeError, TypeError, ValueError):
                pass  # no record, or a file `resume` will ignore (and say so): choose anew
        return fastpath.choose(opts.cpu_fast_path, model, (self.data.in_channels, *self.data.image_size),
                               self.batch_size // distributed.world(), device=self.device, amp=opts.amp,
                               steps=self.epochs * self.steps_per_epoch, log=lambda m: self.log(f"{self.desc}: {m}"))

    def saved_state(self) -> dict | None:
        """The checkpoint file's contents, read once (the fast-path choice and `resume` both need them);
        None without a file; raises CheckpointError for one that cannot be read."""
        if not hasattr(self, "_saved"):
            try:
                exists = self.checkpoint is not None and self.checkpoint.is_file()
                self._saved = safe_load(self.checkpoint, "training checkpoint") if exists else None
            except CheckpointError as exc:
                self._saved = exc
        if isinstance(self._saved, CheckpointError):
            raise self._saved
        return self._saved

    def resume(self) -> None:
        """Continue from the checkpoint file, if there is one this fit can use."""
        try:
            state = self.saved_state()
            self._saved = None   # read once, restored once: not kept in memory for the whole fit
            if state is None:
                return
            self.restore(state)
            self.good = self.snapshot()
            where = (f"epoch {self.prog.epoch + 1}, step {self.prog.step}/{self.steps_per_epoch}"
                     if self.prog.epoch < self.epochs else "the end of training")
            self.log(f"{self.desc}: resuming from {self.checkpoint.name} at {where}")
        except (CheckpointError, AttributeError, KeyError, TypeError, ValueError, RuntimeError) as exc:
            self.restore(_load_blob(self.good))
            self.log(f"{self.desc}: ignoring {self.checkpoint} ({str(exc).splitlines()[0][:200]}); starting this "
                     f"stage from scratch")

    def save(self) -> None:
        self.good = self.snapshot()
        if self.checkpoint is not None and self.rank == 0:
            atomic_write_bytes(self.checkpoint, self.good)

    def rollback(self, why: str) -> None:
        """Back to the last good state with the learning rate halved; StageError after max_rollbacks."""
        opts, tries = self.opts, self.prog.rollbacks + 1
        if self.prog.rollbacks >= self.max_rollbacks:
            raise StageError(f"{self.desc}: {why}, and {self.max_rollbacks} rollbacks, each halving the learning "
                             f"rate (last try: lr {opts.lr * 0.5 ** self.prog.rollbacks:.3g}), did not help; lower "
                             f"lr (the config has {opts.lr:g}), check the data"
                             f"{', or set amp: false' if self.scaler.is_enabled() else ''}")
        self.restore(_load_blob(self.good))
        self.prog.rollbacks = tries
        self.halve_lr()
        self.good = self.snapshot()
        self.log(f"{self.desc}: {why}: rolled back to epoch {self.prog.epoch + 1} step {self.prog.step} with the "
                 f"learning rate halved (rollback {tries} of {self.max_rollbacks})")

    def stop(self, signum: int, at: str, saved: bool = False) -> None:
        """Raise Interrupted, checkpointing first unless the weights went non-finite."""
        name, checkpoint = signal.Signals(signum).name, self.checkpoint
        if checkpoint is None:
            raise Interrupted(f"{self.desc}: stopped by {name} {at}")
        if saved or self.finite():
            if not saved:
                self.save()
            raise Interrupted(f"{self.desc}: stopped by {name} {at}; progress saved to {checkpoint}; "
                              f"run the same command again to resume")
        raise Interrupted(f"{self.desc}: stopped by {name} {at}; the weights were non-finite, so the last good "
                          f"checkpoint ({checkpoint}) was kept")

    def halve_lr(self) -> None:
        """Halve every learning rate the schedule derives from (LambdaLR: base_lrs; OneCycleLR: the groups)."""
        for group in self.optimizer.param_groups:
            for key in ("lr", "initial_lr", "max_lr", "min_lr"):
                if key in group:
                    group[key] *= 0.5
        if hasattr(self.scheduler, "base_lrs"):
            self.scheduler.base_lrs = [lr * 0.5 for lr in self.scheduler.base_lrs]

    def finite(self) -> bool:
        return not nonfinite_tensors(self.model.state_dict())


def _load_blob(blob: bytes) -> dict:
    return torch.load(io.BytesIO(blob), map_location="cpu", weights_only=True)


@contextmanager
def _stop_on_signals(enabled: bool):
    """Turn SIGINT/SIGTERM into a request to stop after the current step (a second one stops at once)."""
    received: list[int] = []
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield received
        return

    def handler(signum, frame):
        if received:
            raise KeyboardInterrupt
        received.append(signum)

    previous = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for s, h in previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)


# ----------------------------------------------------------------------------- the loop

def fit(model: nn.Module, data, opts: OptimConfig, epochs: int, *, device: torch.device,
        teachers: list[nn.Module] = (), kd_loss: Callable | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None,  # added to the loss (prune: L1 on BN scales)
        log: Callable[[str], None] = print, progress: bool = True, desc: str = "train",
        checkpoint: str | os.PathLike | None = None,       # resume from / save to this file (None: no resume)
        nonfinite_patience: int = NONFINITE_PATIENCE,      # non-finite losses in a row before a rollback
        max_rollbacks: int = MAX_ROLLBACKS) -> dict:       # rollbacks before StageError
    """Train `model` in place for `epochs`; returns metrics and leaves the best-on-validation weights loaded.

    With `teachers`, the loss is `kd_loss(student_logits, [teacher_logits...], labels)`; the
    teachers run frozen, in eval mode, without autograd. With `checkpoint`, training resumes
    from that file when it exists and rewrites it after every epoch (and on SIGINT/SIGTERM,
    which then raise `Interrupted`); the caller deletes it once the result is saved.
    """
    tr = _Trainer(model, data, opts, epochs, device=device, teachers=teachers, kd_loss=kd_loss, penalty=penalty,
                  log=log, desc=desc, checkpoint=checkpoint, nonfinite_patience=nonfinite_patience,
                  max_rollbacks=max_rollbacks)
    tr.resume()
    steps = tr.steps_per_epoch
    columns = [TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TimeRemainingColumn()]
    with _stop_on_signals(tr.checkpoint is not None) as signals, \
            Progress(*columns, disable=not progress, transient=False) as bar:
        task = bar.add_task(desc, total=epochs * steps, info="")
        while tr.prog.epoch < epochs:
            epoch = tr.prog.epoch
            model.train()
            t0 = time.perf_counter() - tr.prog.epoch_seconds
            rolled_back = False
            for step, x, y in tr.batches(epoch):
                loss, logits = tr.loss(x, y)
                bad = tr.optimizer_step(loss)
                tr.accumulate(step, loss, logits, y, bad)
                refresh = (step + 1) % REFRESH_EVERY == 0 or step + 1 == steps
                # The host reads the device only here, every REFRESH_EVERY steps: a streak of non-finite
                # losses (their steps already skipped) is caught within that many steps.
                if (refresh or signals) and (tripped := int(tr.prog.tripped)) >= 0:
                    tr.rollback(f"{nonfinite_patience} non-finite losses in a row (epoch {epoch + 1}, "
                                f"step {tripped + 1})")
                    rolled_back = True
                    if signals:
                        tr.stop(signals[0], f"at epoch {tr.prog.epoch + 1}, step {tr.prog.step}/{steps}")
                    break
                if signals:
                    tr.prog.epoch_seconds = time.perf_counter() - t0
                    tr.stop(signals[0], f"at epoch {epoch + 1}, step {step + 1}/{steps}")
                if refresh:
                    bar.update(task, completed=epoch * steps + step + 1, info=tr.progress_info(epoch, t0))
            if rolled_back:
                continue
            if not tr.finite():  # a finite loss can still leave inf weights (e.g. overflowing gradients)
                tr.rollback(f"the weights became non-finite in epoch {epoch + 1}")
                continue
            tr.end_epoch(epoch, t0)
            if signals:
                tr.stop(signals[0], f"after epoch {epoch + 1}", saved=True)
    return tr.finish()
