"""`train`: a model from the registry (or the user's own module), trained from scratch."""

from __future__ import annotations

from compress.config import TrainStage
from compress.context import Artifact, Context
from compress.training import fit


def run(cfg: TrainStage, ctx: Context) -> Artifact:
    model = ctx.build_model(cfg.model)
    metrics = fit(model, ctx.data, cfg, cfg.epochs, device=ctx.device, log=ctx.log, progress=ctx.progress,
                  desc=ctx.stage_name, checkpoint=ctx.checkpoint)
    return ctx.save_model(model, cfg.model, "train", metrics)
