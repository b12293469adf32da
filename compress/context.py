"""What travels between stages: the run context (device, seed, paths, data, log) and artifacts.

Stages never import each other; a stage reads its inputs' `Artifact`s from the context and
returns its own.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from compress import distributed
from compress.io import load_model, save_model
from compress.registry import check_model, count_macs, count_params, create_model


class StageError(RuntimeError):
    """A stage that cannot do what its config asks (e.g. an unreachable prune target); one line for the user."""


@dataclass
class Artifact:
    """A model produced by a stage, in every form later stages and the report need."""

    name: str                       # the stage name in the pipeline (unique)
    stage: str                      # stage type: train, distill, prune, quantize
    parent: str | None              # the stage it was made from (first `from:` entry)
    model: str                      # registry name (or file.py:Class) of the architecture
    files: dict[str, str] = field(default_factory=dict)   # "model" (.pt), "onnx", "onnx_int8", engines...
    params: int | None = None
    macs: int | None = None
    precision: str = "fp32"         # fp32 or int8 (quantize stage)
    metrics: dict[str, Any] = field(default_factory=dict)  # val accuracy, export parity, wall time...

    def path(self, key: str) -> Path | None:
        value = self.files.get(key)
        return Path(value) if value else None


@dataclass
class Context:
    run_dir: Path                   # runs/<pipeline name>
    stage_dir: Path                 # runs/<pipeline name>/<stage name>
    stage_name: str
    device: torch.device
    seed: int
    data: Any                       # compress.data.DataModule
    inputs: list[Artifact]          # the artifacts named by this stage's `from:` (in order)
    teachers: list[Artifact]        # who teaches this stage (distill: its inputs; prune: see pipeline)
    artifacts: dict[str, Artifact]  # every artifact finished so far, by stage name
    base_dir: Path = Path(".")      # directory of the pipeline file (user model paths are relative to it)
    log: Callable[[str], None] = print
    progress: bool = True           # show progress bars
    checkpoint: Path | None = None  # training.fit resumes from / saves to this file (None: no resume)
    # What the runner hands on to the stages after the model stages (each still `run(cfg, ctx)`):
    artifact: Artifact | None = None                     # export: the artifact the stage just made
    engines: dict = field(default_factory=dict)          # benchmark: {artifact: {precision: build status}}
    rows: list = field(default_factory=list)             # report: the benchmark rows
    stage_times: dict = field(default_factory=dict)      # report: wall seconds per stage, and "total"
    reused: frozenset = frozenset()                      # report: the stages taken from the cache this run
    pipeline_path: Path | None = None                    # report: the YAML the run came from

    def input_shape(self) -> tuple[int, int, int]:
        return (self.data.in_channels, *self.data.image_size)

    def build_model(self, name: str) -> nn.Module:
        """A fresh model from the registry, checked to map this data's images to its classes."""
        model = create_model(name, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                             base_dir=self.base_dir)
        check_model(model, name, self.input_shape(), self.data.num_classes)  # params, not lazy, (N, classes) out
        model.train()
        return model

    def save_model(self, model: nn.Module, model_name: str, stage: str, metrics: dict,
                   parent: str | None = None) -> Artifact:
        """Write `model.pt` in the stage directory and describe it as this stage's artifact."""
        model = model.cpu().eval()
        path = self.stage_dir / "model.pt"
        if distributed.is_main():  # under torchrun every process has the same weights; rank 0 writes them
            save_model(model, path, name=model_name, num_classes=self.data.num_classes,
                       in_channels=self.data.in_channels)
        return Artifact(name=self.stage_name, stage=stage, parent=parent, model=model_name,
                        files={"model": str(path)}, params=count_params(model),
                        macs=count_macs(model, self.input_shape()), metrics=metrics)

    def load_model(self, artifact: Artifact) -> nn.Module:
        path = artifact.path("model")
        if path is None:
            raise ValueError(f"stage {artifact.name!r} has no PyTorch model (it is {artifact.precision} ONNX)")
        return load_model(path, base_dir=self.base_dir)


def seed_everything(seed: int) -> torch.Generator:
    """Seed python, numpy, torch (and CUDA); return a torch generator for data order."""
    random.seed(seed)
    np.random.seed(seed % (2**32))
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    g = torch.Generator()
    g.manual_seed(seed)
    return g
