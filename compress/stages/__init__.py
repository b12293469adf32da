"""One module per stage type, each a short adapter: `run(cfg, ctx) -> Artifact`.

The model stages (train, distill, prune, quantize: the rows of compress.config.STAGE_TYPES)
read their inputs from the context and return their artifact; the library code they call lives
beside them (compress.training, compress.losses, compress.prune, compress.quant). export, engine,
benchmark and report run after them, on every artifact (see compress.pipeline).
"""

from __future__ import annotations

from importlib import import_module
from typing import Any, Protocol

from compress.config import STAGE_TYPES
from compress.context import Artifact, Context


class StageRun(Protocol):
    def __call__(self, cfg: Any, ctx: Context) -> Artifact: ...


def runner(stage_type: str) -> StageRun:
    """The `run` of a stage type's adapter module (named by its row in STAGE_TYPES)."""
    return import_module(STAGE_TYPES[stage_type].module).run
