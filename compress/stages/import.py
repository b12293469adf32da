"""`import`: a model trained elsewhere (a registry architecture or the user's file.py:Class, plus a weights
file), brought into the pipeline as it is. No training: the weights are loaded (compress.weights), the model
is scored on the validation split and saved; export and the parity check follow as for every model, and it
can be the `from:` of distill, prune and quantize, or a teacher.

(`import` is a Python keyword: this module is reached by name, through compress.stages.runner.)
"""

from __future__ import annotations

import torch

from compress.config import ImportStage, weights_path
from compress.context import Artifact, Context
from compress.training import evaluate
from compress.weights import load_weights


def run(cfg: ImportStage, ctx: Context) -> Artifact:
    model = ctx.build_model(cfg.model)
    loaded = load_weights(model, weights_path(cfg.weights, ctx.base_dir), num_classes=ctx.data.num_classes,
                          model_name=repr(cfg.model))
    model.to(ctx.device).eval()
    split = "val" if ctx.data.num_val else "train"  # as fit does without a validation split
    with torch.inference_mode():
        accuracy = evaluate(model, ctx.data.eval_batches(split))
    ctx.log(f"[{ctx.stage_name}] {cfg.model} from {loaded['weights']} ({loaded['weights_format']}): "
            f"{split} {accuracy:.2f}%")
    metrics = {"best_accuracy": accuracy, "best_split": split, "epochs": 0, **loaded}
    return ctx.save_model(model, cfg.model, cfg.type, metrics)
