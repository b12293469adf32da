"""`distill`: a small student trained to match one or several frozen teachers.

The loss is chosen by `method:` (kd, dkd, dist, logit_std, none) plus an optional
`features: {method: fitnet | at}` term; see compress.losses for the papers and
compress.config.KDConfig for the defaults. With several teachers (`from: [a, b]`, optionally
`teacher_weights:`) the logit term compares the student with their averaged softened
probabilities, and a feature term reads the first teacher.
"""

from __future__ import annotations

from compress.config import DistillStage
from compress.context import Artifact, Context, StageError
from compress.losses import build_loss
from compress.training import fit
from compress.weights import start_from


def run(cfg: DistillStage, ctx: Context) -> Artifact:
    teachers = [ctx.load_model(a) for a in ctx.teachers]
    student = ctx.build_model(cfg.model)
    started = start_from(student, cfg, ctx)  # weights: the student starts from them
    try:
        loss = build_loss(cfg, teachers, student, ctx.data)
    except ValueError as exc:  # e.g. a feature layer the model does not have
        raise StageError(f"stage {ctx.stage_name!r}: {exc}") from None
    with loss:  # removes the feature hooks from the student and the teacher afterwards
        metrics = fit(student, ctx.data, cfg, cfg.epochs, device=ctx.device, teachers=teachers, kd_loss=loss,
                      log=ctx.log, progress=ctx.progress, desc=ctx.stage_name, checkpoint=ctx.checkpoint)
    metrics.update(started, teachers=[a.name for a in ctx.teachers])
    metrics["distill"] = describe(cfg, loss)
    return ctx.save_model(student, cfg.model, cfg.type, metrics, parent=ctx.inputs[0].name)


def describe(cfg: DistillStage, loss) -> dict:
    """The loss as it ran (defaults resolved, feature layers named), for the manifest and the report."""
    out = {"method": cfg.method, "temperature": cfg.temperature, "alpha": cfg.alpha, "ce_weight": cfg.ce_weight}
    if cfg.method in ("dkd", "dist"):
        out[cfg.method] = getattr(cfg, cfg.method).model_dump()
    if cfg.teacher_weights is not None:
        out["teacher_weights"] = list(cfg.teacher_weights)
    if loss.features is not None:
        out["features"] = {"method": cfg.features.method, "weight": cfg.features.weight,
                           "pairs": [list(p) for p in loss.features.pairs]}
    return out
