"""The run directory and its stage manifests: one writer, one reader, one schema version.

    runs/<pipeline name>/
      .lock                          held by the running pipeline (compress.pipeline.run_lock)
      <stage>/manifest.json          a StageManifest (this module alone writes and parses it)
      <stage>/model.pt, model.onnx, model_int8.onnx, layers.md, layers.json ...
      <stage>/engines/<precision>.plan (+ its sidecar .plan.json, compress.trt); see engine_path
      <stage>/checkpoint-<key>.pt    while the stage trains (compress.training)

A manifest vouches for its stage: the config and cache key it ran with, the sha256 of its inputs
and outputs, versions, the data's preprocessing and labels, and its artifact. Engines are built
after the stages (compress.stages.engine) and recorded in their stage's manifest by
`record_engines`, so deploy finds them there instead of by a path convention.

Schema versions (`format`): compress.stage/2 adds `format` and `engines`; manifests written
before this module have no `format` and the same fields otherwise: they load as version 1
(no engines recorded; `engine_file` falls back to the conventional path). Any other format is
one clear error naming it. The pipeline's cache check, deploy and the tests read through here.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from compress.context import Artifact
from compress.io import atomic_write_json

MANIFEST = "manifest.json"
FORMAT = "compress.stage/2"
READABLE = ("compress.stage/1", FORMAT)   # version 1: the manifests from before `format` existed
MAX_MANIFEST_BYTES = 64 << 20

# Which pipeline file owns the run directory: `runs/<name>/run.json`, written when its first stage
# runs, checked before anything is reused or written (two pipeline files with the same `name:`
# would otherwise overwrite each other's stages and report).
RUN_RECORD = "run.json"
RUN_FORMAT = "compress.run/1"


class RunDirError(ValueError):
    """A run directory or manifest this version cannot use; one line for the user."""


class RunOwnedError(RunDirError):
    """The run directory or report directory belongs to another pipeline file."""


class NoManifest(RunDirError):
    """No readable manifest (never written, half-written, not JSON): the stage has simply not run."""


class StageUnfinished(RunDirError):
    """A manifest for a stage that did not finish (or ran with another cache key)."""


@dataclass
class EngineRecord:
    """One TensorRT engine an engine stage tried to build for this stage's artifact."""

    status: str                     # ok, skipped, failed
    reason: str | None = None       # why not ok
    engine: str | None = None       # the .plan path (ok only)
    build_s: float | None = None


@dataclass
class StageManifest:
    """`<stage>/manifest.json`, typed."""

    stage: str                      # the stage name
    key: str                        # the cache key it ran with (compress.pipeline.stage_key)
    artifact: Artifact
    config: dict[str, Any]          # the stage's config as run
    inputs: dict[str, dict[str, str]]   # input artifact -> file kind -> sha256
    teachers: list[str]
    outputs: dict[str, str]         # file kind -> sha256 of the artifact's files
    versions: dict[str, Any]
    data: dict[str, Any]            # preprocessing and labels: a run directory alone is deployable
    wall_seconds: float
    processes: int = 1
    finished: str = ""
    status: str = "done"
    engines: dict[str, EngineRecord] = field(default_factory=dict)   # precision -> record
    format: str = FORMAT

    def to_json(self) -> dict:
        return {"format": self.format, **{k: v for k, v in asdict(self).items() if k != "format"}}

    def engine_file(self, run_dir: Path, precision: str) -> Path:
        """Where this stage's `precision` engine is: as recorded, else where the engine stage writes it."""
        record = self.engines.get(precision)
        if record is not None and record.engine and Path(record.engine).is_file():
            return Path(record.engine)
        return engine_path(run_dir, self.stage, precision)


def manifest_path(stage_dir: Path) -> Path:
    return Path(stage_dir) / MANIFEST


def engine_path(run_dir: Path, stage: str, precision: str) -> Path:
    """The one place the engine file name is made."""
    return Path(run_dir) / stage / "engines" / f"{precision}.plan"


def stage_names(run_dir: Path) -> list[str]:
    """The stage directories of a run that hold a manifest (sorted)."""
    return sorted(p.name for p in Path(run_dir).iterdir() if p.is_dir() and manifest_path(p).is_file())


# ----------------------------------------------------------------------------- writing


def write_stage(stage_dir: Path, manifest: StageManifest) -> Path:
    """Write the manifest atomically (the last file of a stage: it vouches for the others)."""
    return atomic_write_json(manifest_path(stage_dir), manifest.to_json())


def record_engines(run_dir: Path, engines: dict[str, dict[str, dict]]) -> None:
    """Add the engine stage's results ({artifact: {precision: status}}) to each artifact's manifest."""
    for name, by_precision in engines.items():
        try:
            manifest = read_stage(Path(run_dir) / name)
        except RunDirError:
            continue  # a stage that is not on disk (another process's run, or a test) has nothing to record
        manifest.engines = {p: EngineRecord(status=s["status"], reason=s.get("reason"), engine=s.get("engine"),
                                            build_s=s.get("build_s"))
                            for p, s in by_precision.items()}
        write_stage(Path(run_dir) / name, manifest)


# ----------------------------------------------------------------------------- reading


def _raw(path: Path) -> dict:
    from compress.io import FileReadError, read_regular_file

    try:
        data = json.loads(read_regular_file(path, MAX_MANIFEST_BYTES, "manifest"))
    except FileNotFoundError:
        raise NoManifest(f"{path}: no manifest") from None
    except FileReadError as exc:
        raise NoManifest(str(exc)) from None
    except (OSError, ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [""])[0][:120]
        raise NoManifest(f"{path}: unreadable ({type(exc).__name__}: {first})") from None
    if not isinstance(data, dict):
        raise NoManifest(f"{path}: not a JSON object")
    return data


def read_stage(stage_dir: Path, *, key: str | None = None) -> StageManifest:
    """The manifest of a finished stage; with `key`, only if it ran with that cache key.

    Raises NoManifest (nothing usable there), StageUnfinished (not done, or another key) or
    RunDirError (a manifest of another format, or damaged), each with one line.
    """
    path = manifest_path(stage_dir)
    data = _raw(path)
    fmt = data.get("format", "compress.stage/1")
    if fmt not in READABLE:
        raise RunDirError(f"{path}: manifest format {str(fmt)[:60]!r}, which this version of compress does not "
                          f"read (it reads {', '.join(READABLE)}); re-run the pipeline with this version")
    if data.get("status") != "done" or "artifact" not in data:
        raise StageUnfinished(f"{path}: stage {Path(stage_dir).name!r} did not finish")
    if key is not None and data.get("key") != key:
        raise StageUnfinished(f"{path}: ran with another cache key")
    try:
        art = data["artifact"]
        if not (isinstance(art, dict) and isinstance(art.get("files"), dict)
                and all(isinstance(k, str) and isinstance(v, str) for k, v in art["files"].items())):
            raise TypeError("artifact.files must map names to paths")
        for name in ("outputs", "data", "versions", "config", "inputs", "engines"):
            if not isinstance(data.get(name) or {}, dict):
                raise TypeError(f"{name} must be a mapping")
        return StageManifest(
            stage=str(data.get("stage", Path(stage_dir).name)), key=str(data.get("key", "")),
            artifact=Artifact(**art), config=data.get("config") or {}, inputs=data.get("inputs") or {},
            teachers=list(data.get("teachers") or []), outputs=dict(data["outputs"]),
            versions=data.get("versions") or {}, data=data.get("data") or {},
            wall_seconds=float(data.get("wall_seconds") or 0.0), processes=int(data.get("processes") or 1),
            finished=str(data.get("finished", "")), status="done",
            engines={p: EngineRecord(**r) for p, r in (data.get("engines") or {}).items()}, format=FORMAT)
    except (KeyError, TypeError, ValueError) as exc:
        raise RunDirError(f"{path}: not a stage manifest this version can read "
                          f"({(str(exc).splitlines() or [''])[0][:120]})") from None


# ----------------------------------------------------------------------------- ownership


def _owner_id(pipeline_path: Path) -> str:
    return str(Path(pipeline_path).resolve())


def owner(run_dir: Path) -> str | None:
    """The pipeline file recorded as owning `run_dir` (None: no record, as in runs from before it existed)."""
    path = Path(run_dir) / RUN_RECORD
    if not path.exists():
        return None
    try:
        data = _raw(path)
    except NoManifest as exc:
        raise RunDirError(f"{exc}; delete {path}, or pass --adopt to take the run directory over") from None
    if data.get("format") != RUN_FORMAT or not isinstance(data.get("pipeline"), str):
        raise RunDirError(f"{path}: not a run record this version reads; delete it, or pass --adopt to take the "
                          f"run directory over")
    return data["pipeline"]


def check_owner(run_dir: Path, report_dir: Path | None, pipeline_path: Path, *, adopt: bool = False) -> None:
    """RunOwnedError when another pipeline file owns `run_dir`, or `report_dir` holds the report of a run in
    another directory that still exists. Reads only: call it before anything is written."""
    if adopt:
        return
    me, run_dir = _owner_id(pipeline_path), Path(run_dir)
    recorded = owner(run_dir)
    if recorded is not None and recorded != me:
        raise RunOwnedError(f"{run_dir} belongs to another pipeline file with the same name ({recorded}), not "
                            f"{pipeline_path}; give this run another --out (and --reports), or rename one of the "
                            f"pipelines, or pass --adopt to take the run directory over")
    if report_dir is None:
        return
    from compress.io import FileReadError, read_regular_file

    try:
        report = json.loads(read_regular_file(Path(report_dir) / "report.json", MAX_MANIFEST_BYTES, "report"))
    except (OSError, ValueError, RecursionError, FileReadError):
        return  # no report (or none readable): nothing of another run to protect there
    other = report.get("run_dir") if isinstance(report, dict) else None
    if isinstance(other, str) and Path(other).is_dir() and Path(other).resolve() != run_dir.resolve():
        raise RunOwnedError(f"{report_dir} holds the report of the run in {other}, not {run_dir}; give this run "
                            f"another --reports (or rename one of the pipelines), or pass --adopt to replace it")


def claim(run_dir: Path, pipeline_path: Path) -> None:
    """Record `pipeline_path` as the owner of `run_dir` (written once, atomically; a no-op when recorded)."""
    from datetime import datetime, timezone

    me = _owner_id(pipeline_path)
    try:
        if owner(run_dir) == me:
            return
    except RunDirError:
        pass  # an unreadable record is replaced (check_owner refused it unless --adopt was given)
    atomic_write_json(Path(run_dir) / RUN_RECORD, {
        "format": RUN_FORMAT, "pipeline": me, "name": Path(run_dir).name,
        "claimed": datetime.now(timezone.utc).isoformat(timespec="seconds")})
