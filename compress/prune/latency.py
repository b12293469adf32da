"""Latency as a pruning budget: a probe that times a model the way the benchmark stage does."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from torch import nn

# Latency probes: untimed warm-up calls, then timed calls whose median is the measurement.
LATENCY_WARMUP = 10
LATENCY_ITERS = 50


def latency_probe(runtime: str, input_shape: tuple[int, ...], *, batch: int = 1,
                  device: str | torch.device = "cpu", warmup: int = LATENCY_WARMUP,
                  iters: int = LATENCY_ITERS) -> Callable[[nn.Module], float]:
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
