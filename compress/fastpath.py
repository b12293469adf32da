"""The CPU fast path: channels-last memory and bf16 autocast where they pay, per model and per chip.

On a CPU, which of fp32, channels-last (NHWC: oneDNN's preferred layout for convolutions),
bf16 autocast, or both, trains a model fastest depends on the model and on the chip: on a
Sapphire Rapids core (AMX, AVX-512 BF16) bf16 + channels-last ran resnet20 1.9x faster
than fp32 while mobilenetv2 gained most from channels-last alone (issue 18's table). So
`auto` measures instead of guessing: a short timed probe of one training step per mode on
a copy of the model, at the stage's batch and input shape, cached per machine and model in
a small JSON file (`~/.cache/compress/fastpath.json`, `$XDG_CACHE_HOME` honoured,
`$COMPRESS_FAST_PATH_CACHE` names another file). Rules:

* bf16 only where the chip has it natively (AMX or AVX-512 BF16). Elsewhere PyTorch emulates
  bf16 in fp32 arithmetic plus conversions: it runs, slowly, so `auto` never picks it there;
  an explicit `cpu_fast_path: bf16` still runs it (with a warning), e.g. to test resume.
* A mode must beat fp32 by MARGIN to be picked: a probe on a busy machine is noisy, and a
  mode that wins by less is not worth a change of numerics. A run of fewer than
  MIN_PROBE_STEPS steps is not probed (fp32, unless the cache already knows better).
* The probe never touches the caller's model or the global RNG (it runs on a deep copy,
  inside `torch.random.fork_rng`), so seeds and resume behave as without it.
* On CUDA nothing is probed: channels-last always, and `amp:` picks bf16 (or fp16 with a
  gradient scaler where the GPU lacks bf16), as before.

The chosen `FastPath` is recorded in each training stage's metrics (and so its manifest and
the report) with the timings that decided it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

# The CPU modes, in the order the probe measures them; `off` in a config means fp32.
MODES = ("fp32", "channels_last", "bf16", "bf16_channels_last")
SETTINGS = ("auto", "off", "channels_last", "bf16", "bf16_channels_last")
NATIVE_BF16_FLAGS = ("amx_bf16", "avx512_bf16")   # /proc/cpuinfo flags of a CPU that computes in bf16
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
MARGIN = 1.05            # a mode must be this much faster than fp32 (images/s) for `auto` to pick it
MIN_PROBE_STEPS = 100    # fewer steps to run than this: a probe (~10 steps, plus set-up) costs more than it saves
PROBE_WARMUP = 2         # untimed steps per mode (allocator, oneDNN primitive cache)
PROBE_STEPS = 3          # timed steps per mode, in turns; the fastest counts (a busy machine only slows)
CACHE_FORMAT = "compress.fastpath/1"


def cpu_flags() -> set[str]:
    """The instruction-set flags of this CPU (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def native_bf16(flags: set[str] | None = None) -> bool:
    """True where the CPU computes bf16 itself (AMX or AVX-512 BF16); elsewhere PyTorch emulates it."""
    flags = cpu_flags() if flags is None else flags
    return any(f in flags for f in NATIVE_BF16_FLAGS)


def isa(flags: set[str] | None = None) -> list[str]:
    """The instruction sets that matter for training speed, for reports: e.g. ['avx2', 'fma']."""
    flags = cpu_flags() if flags is None else flags
    return [f for f in ISA_FLAGS if f in flags]


@dataclass(frozen=True)
class FastPath:
    """How a model trains (or runs) on its device: memory format and autocast dtype, and why."""

    device: str                       # "cpu" or "cuda"
    channels_last: bool = False
    autocast: str | None = None       # "bf16", "fp16" (CUDA without bf16) or None
    setting: str = "off"              # what the config asked for: auto, off, channels_last, ...
    reason: str = ""                  # one line: why this mode
    images_per_s: dict | None = None  # the probe's measurements per mode (auto on CPU)

    @property
    def mode(self) -> str:
        if self.autocast:
            return f"{self.autocast}_channels_last" if self.channels_last else self.autocast
        return "channels_last" if self.channels_last else "fp32"

    def context(self):
        """The autocast context for the forward pass (and the loss), or a no-op."""
        if self.autocast is None:
            return nullcontext()
        return torch.autocast(self.device, dtype=torch.bfloat16 if self.autocast == "bf16" else torch.float16)

    def scaler(self):
        """A gradient scaler, working where fp16 needs one (CUDA without bf16), else a no-op (`enabled=False`)."""
        return torch.amp.GradScaler("cuda", enabled=self.autocast == "fp16")

    def model(self, module: nn.Module) -> nn.Module:
        return module.to(memory_format=torch.channels_last) if self.channels_last else module

    def input(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last and x.ndim == 4 else x

    def record(self) -> dict:
        """For the manifest and the report."""
        return {"mode": self.mode, **asdict(self)}


def fixed(mode: str, device: str = "cpu", setting: str | None = None, reason: str = "") -> FastPath:
    """The FastPath of one named CPU mode (fp32, channels_last, bf16, bf16_channels_last)."""
    if mode not in MODES:
        raise ValueError(f"unknown fast-path mode {mode!r}; expected one of {', '.join(MODES)}")
    return FastPath(device=device, channels_last=mode.endswith("channels_last"),
                    autocast="bf16" if mode.startswith("bf16") else None,
                    setting=setting or mode, reason=reason)


# ----------------------------------------------------------------------------- the probe

def _step(model: nn.Module, x: torch.Tensor, y: torch.Tensor, mode: str, train: bool) -> Callable[[], None]:
    """One training step (or inference forward) of a copy of `model` in `mode`, as a call."""
    path = fixed(mode)
    net = path.model(copy.deepcopy(model))
    x = path.input(x)
    if not train:
        net.eval()

        def forward():
            with torch.inference_mode(), path.context():
                net(x)
        return forward
    net.train()
    opt = torch.optim.SGD([p for p in net.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)

    def step():
        with path.context():
            loss = F.cross_entropy(net(x).float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return step


def probe(model: nn.Module, input_shape: tuple[int, ...], batch: int, modes: tuple[str, ...],
          train: bool = True, num_classes: int | None = None,
          warmup: int = PROBE_WARMUP, steps: int = PROBE_STEPS) -> dict[str, float]:
    """Images/s of one training step (or one inference forward) per mode, on a copy of `model`.

    Random inputs from a private generator; the global RNG (dropout in the copy) is restored
    afterwards, so a probe never shifts what a seeded run does next.
    """
    with torch.random.fork_rng(devices=[]), torch.no_grad() if not train else nullcontext():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, *input_shape, generator=g)
        if num_classes is None:
            with torch.no_grad():
                was = model.training
                num_classes = int(model.eval()(x[:1]).shape[1])
                model.train(was)
        y = torch.randint(0, num_classes, (batch,), generator=g)
        calls = {m: _step(model, x, y, m, train) for m in modes}
        times: dict[str, list[float]] = {m: [] for m in modes}
        # Round-robin over the modes, so that a neighbour's load slows them alike, not one mode's turn.
        for i in range(warmup + steps):
            for m, call in calls.items():
                t0 = time.perf_counter()
                call()
                if i >= warmup:
                    times[m].append(time.perf_counter() - t0)
        return {m: round(batch / min(t), 1) for m, t in times.items()}


# ----------------------------------------------------------------------------- the cache

def cache_path() -> Path:
    env = os.environ.get("COMPRESS_FAST_PATH_CACHE")
    if env:
        return Path(env)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "compress" / "fastpath.json"


def machine_key(flags: set[str] | None = None) -> str:
    """One string per (CPU model, instruction sets, torch version, threads): a probe holds for it alone."""
    from compress.runtime import _cpu_model

    return (f"{_cpu_model()} | {' '.join(isa(flags))} | torch {torch.__version__} | "
            f"{torch.get_num_threads()} threads")


def model_key(model: nn.Module, input_shape: tuple[int, ...], batch: int, train: bool) -> str:
    """The architecture as it is now (class and size: a pruned model is another key), shape, batch, task."""
    params = sum(p.numel() for p in model.parameters())
    layers = hashlib.sha256(repr(model).encode()).hexdigest()[:10]   # the layers and their sizes
    return (f"{type(model).__name__} {params} params ({layers}) | input {'x'.join(map(str, input_shape))} | "
            f"batch {batch} | {'train' if train else 'inference'}")


def _read_cache(path: Path, log: Callable[[str], None]) -> dict:
    try:
        cache = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log(f"cpu fast path: ignoring the probe cache {path} ({type(exc).__name__}); measuring again")
        return {}
    if not isinstance(cache, dict) or cache.get("format") != CACHE_FORMAT or not isinstance(cache.get("machines"), dict):
        log(f"cpu fast path: ignoring the probe cache {path} (not a {CACHE_FORMAT} file); measuring again")
        return {}
    return cache


def _cached_rates(cache: dict, machine: str, key: str, modes: tuple[str, ...]) -> dict[str, float] | None:
    entry = (cache.get("machines", {}).get(machine) or {}).get(key)
    rates = entry.get("images_per_s") if isinstance(entry, dict) else None
    if not isinstance(rates, dict):
        return None
    if not all(isinstance(rates.get(m), (int, float)) and rates[m] > 0 for m in modes):
        return None
    return {m: float(rates[m]) for m in modes}


def _write_cache(path: Path, machine: str, key: str, rates: dict[str, float], log: Callable[[str], None]) -> None:
    from compress.io import atomic_write_json

    cache = _read_cache(path, lambda m: None) or {"format": CACHE_FORMAT, "machines": {}}
    entry = cache["machines"].setdefault(machine, {}).setdefault(key, {})
    if not isinstance(entry, dict):
        entry = cache["machines"][machine][key] = {}
    entry["images_per_s"] = {**(entry.get("images_per_s") if isinstance(entry.get("images_per_s"), dict) else {}),
                             **rates}
    entry["measured"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, cache)
    except OSError as exc:  # a read-only home is no reason to fail a training run
        log(f"cpu fast path: could not write the probe cache {path} ({exc.strerror or exc}); it will be measured "
            f"again next time")


# ----------------------------------------------------------------------------- the choice

def decide(rates: dict[str, float]) -> tuple[str, str]:
    """The mode `auto` picks from measured images/s, and why (fp32 unless another beats it by MARGIN)."""
    base = rates["fp32"]
    best = max(rates, key=lambda m: rates[m])
    if best != "fp32" and rates[best] >= MARGIN * base:
        return best, f"probe: {rates[best]:,.0f} img/s against {base:,.0f} in fp32 ({rates[best] / base:.2f}x)"
    return "fp32", (f"probe: nothing beat fp32 ({base:,.0f} img/s) by {MARGIN - 1:.0%} "
                    f"(best other: {best if best != 'fp32' else '-'})")


def choose(setting: str, model: nn.Module, input_shape: tuple[int, ...], batch: int, *,
           device: torch.device | str, amp: bool = True, train: bool = True,
           steps: int | None = None, log: Callable[[str], None] = print, flags: set[str] | None = None,
           measure: Callable[..., dict[str, float]] | None = None) -> FastPath:
    """The FastPath for `model` on `device`: explicit settings as given, `auto` from a (cached) probe.

    setting   auto | off | channels_last | bf16 | bf16_channels_last (the config's `cpu_fast_path`)
    amp       the config's `amp`: false keeps bf16 out of `auto` (and CUDA in fp32)
    train     probe a training step (True) or an inference forward (False, the benchmark rows)
    steps     how many steps the choice is for (None: many); below MIN_PROBE_STEPS nothing is measured
    flags     CPU flags (default: this CPU's); `measure` replaces the probe (tests inject timings)
    """
    device = torch.device(device)
    if setting not in SETTINGS:
        raise ValueError(f"unknown cpu_fast_path {setting!r}; expected one of {', '.join(SETTINGS)}")
    if device.type == "cuda":
        if not amp:
            return FastPath("cuda", channels_last=True, setting=setting, reason="cuda: channels-last, amp off")
        bf16 = torch.cuda.is_bf16_supported()
        return FastPath("cuda", channels_last=True, autocast="bf16" if bf16 else "fp16", setting=setting,
                        reason="cuda: channels-last and amp (bf16 where supported, else fp16 with a gradient scaler)")
    if device.type != "cpu":
        return FastPath(device.type, setting=setting, reason=f"{device.type}: fp32, nothing probed")
    native = native_bf16(flags)
    if setting != "auto":
        mode = "fp32" if setting == "off" else setting
        reason = "config"
        if mode.startswith("bf16") and not native:
            reason = "config; this CPU has no native bf16 (AMX / AVX-512 BF16): emulated, slower than fp32"
            log(f"cpu fast path: {mode} asked for, but {reason.split('; ')[1]}")
        return fixed(mode, setting=setting, reason=reason)
    modes = MODES if (native and amp) else ("fp32", "channels_last")
    path, machine, key = cache_path(), machine_key(flags), model_key(model, input_shape, batch, train)
    rates = _cached_rates(_read_cache(path, log), machine, key, modes)
    source = "cached "
    if rates is None and steps is not None and steps < MIN_PROBE_STEPS:
        return FastPath("cpu", setting="auto", reason=f"fp32: {steps} steps are too few to be worth a probe")
    if rates is None:
        source = ""
        t0 = time.perf_counter()
        try:
            rates = (measure or probe)(model, tuple(input_shape), batch, modes, train=train)
        except Exception as exc:  # noqa: BLE001 (e.g. a wrapped model that cannot be copied: train as before)
            why = f"the probe failed ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''})"
            log(f"cpu fast path: {why}; fp32")
            return FastPath("cpu", setting="auto", reason=why + "; fp32")
        _write_cache(path, machine, key, rates, log)
        log(f"cpu fast path: probed {', '.join(f'{m} {rates[m]:,.0f}' for m in modes)} img/s in "
            f"{time.perf_counter() - t0:.1f} s (cached in {path})")
    mode, why = decide(rates)
    if not native:
        why += "; bf16 not tried: this CPU has no native bf16 (AMX / AVX-512 BF16)"
    elif not amp:
        why += "; bf16 not tried: amp is off"
    return FastPath("cpu", channels_last=mode.endswith("channels_last"),
                    autocast="bf16" if mode.startswith("bf16") else None,
                    setting="auto", reason=source + why, images_per_s=rates)
