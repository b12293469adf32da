"""`train`: a model from the registry (or the user's own module), trained from scratch or, with
`weights:`, fine-tuned from trained weights."""

from __future__ import annotations

from compress.config import TrainStage
from compress.context import Artifact, Context
from compress.training import fit
from compress.weights import start_from


def run(cfg: TrainStage, ctx: Context) -> Artifact:
    model = ctx.build_model(cfg.model)
    started = start_from(model, cfg, ctx)  # weights: fine-tune from them
    metrics = fit(model, ctx.data, cfg, cfg.epochs, device=ctx.device, log=ctx.log, progress=ctx.progress,
                  desc=ctx.stage_name, checkpoint=ctx.checkpoint)
    return ctx.save_model(model, cfg.model, cfg.type, {**metrics, **started})
