"""`distill`: a small student trained to match one or several frozen teachers.

Hinton et al. 2015 (see compress.losses.KDLoss); with several teachers (`from: [a, b]`)
the student matches the average of their softened distributions.
"""

from __future__ import annotations

from compress.config import DistillStage
from compress.context import Artifact, Context
from compress.losses import KDLoss
from compress.training import fit


def run(cfg: DistillStage, ctx: Context) -> Artifact:
    teachers = [ctx.load_model(a) for a in ctx.teachers]
    student = ctx.build_model(cfg.model)
    loss = KDLoss(cfg.temperature, cfg.alpha, cfg.label_smoothing)
    metrics = fit(student, ctx.data, cfg, cfg.epochs, device=ctx.device, teachers=teachers, kd_loss=loss,
                  log=ctx.log, progress=ctx.progress, desc=ctx.stage_name)
    metrics["teachers"] = [a.name for a in ctx.teachers]
    return ctx.save_model(student, cfg.model, "distill", metrics, parent=ctx.inputs[0].name)
