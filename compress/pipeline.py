"""Stage graph runner: order, cache keys, manifests, then engines, benchmark and report.

Data flow: validated config -> one directory per run (`runs/<name>/<stage>/`: the stage's
model, its ONNX and a manifest with config, input hashes, versions, metrics and wall time)
-> benchmark rows -> `reports/<name>/`.

A stage is skipped when its cache key (its config, the data config and seed, the hashes of
its inputs' files and the package version) matches the manifest from a previous run and
its files are still there with the hashes the manifest recorded, DVC-style; everything
downstream of a re-run stage re-runs because its inputs' hashes change. The benchmark,
engine and report sections are not in any key: editing them re-runs no training.

A stage that trains checkpoints into `checkpoint-<key>.pt` in its directory (see
compress.training); a killed run resumes there, and the file goes once the manifest is
written. One run at a time per run directory: `runs/<name>/.lock` is held with flock, which
the kernel releases when the process dies, so a killed run never leaves it stuck.

Under torchrun (`compress run --nproc N`) every process runs this loop; the stage types marked
data_parallel in compress.config.STAGE_TYPES train in all of them (see compress.distributed), the rest
run in rank 0, which alone writes files, and hands each artifact to the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager, nullcontext
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import torch

import compress
from compress import distributed, rundir
from compress import tracking
from compress.config import STAGE_TYPES, PipelineConfig, check_weights_files, weights_path
from compress.context import Artifact, Context, seed_everything
from compress.io import sha256_file
from compress.weights import weights_digest

LOCK = ".lock"


class RunLockedError(RuntimeError):
    """Another process is running a pipeline in the same run directory; one line for the user."""


@contextmanager
def run_lock(run_dir: Path):
    """Hold `run_dir/.lock` (flock, non-blocking) for the duration; refuse if another process holds it."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock, as before
        yield
        return
    fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 64).decode(errors="replace").strip()
        os.close(fd)
        pid = f" (pid {holder})" if holder.isdigit() else ""
        raise RunLockedError(f"{run_dir} is in use by another compress run{pid}; wait for it to finish, or "
                             f"use another --out") from None
    try:
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        yield
    finally:
        os.close(fd)  # releases the lock (the kernel does the same for a killed process)


def resolve_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device: cuda was asked for, but torch sees no CUDA GPU (use device: auto or cpu)")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def versions() -> dict:
    from compress.runtime import machine_info

    return {"compress": compress.__version__, **machine_info()["versions"]}


def stage_key(cfg: PipelineConfig, name: str, inputs: list[Artifact], data_fingerprint: str,
              pipeline_dir: Path = Path(".")) -> str:
    stage = cfg.stages[name]
    weights = getattr(stage, "weights", None)  # import, or fine-tuning: the weights file's bytes, not its name
    payload = {
        "stage": stage.model_dump(mode="json", by_alias=True),
        "data": cfg.data.model_dump(mode="json", exclude={"placement", "workers", "cache", "cache_dir"}),  # where, not what
        "data_fingerprint": data_fingerprint,
        "seed": cfg.seed,
        "export": cfg.export.model_dump(mode="json"),
        "inputs": {a.name: {k: sha256_file(v) for k, v in sorted(a.files.items()) if k in ("model", "onnx_int8")}
                   for a in inputs},
        "compress": compress.__version__,
    }
    if weights is not None:
        payload["weights"] = weights_digest(weights_path(weights, pipeline_dir))
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()


def _cached(stage_dir: Path, key: str) -> tuple[Artifact | None, str]:
    """The artifact a previous run left for this key, or None and why not (empty: nothing to say)."""
    try:
        manifest = rundir.read_stage(stage_dir, key=key)
    except (rundir.NoManifest, rundir.StageUnfinished):
        return None, ""
    except rundir.RunDirError as exc:
        return None, str(exc)
    for kind, file in manifest.artifact.files.items():
        if not Path(file).is_file():
            return None, f"{file} is missing"
        # A file changed behind the manifest's back (truncated, edited, half-copied): never trust it.
        if manifest.outputs.get(kind) != sha256_file(file):
            return None, f"{file} does not match the hash its manifest recorded"
    return manifest.artifact, ""


def teachers_of(cfg: PipelineConfig, name: str, artifacts: dict[str, Artifact]) -> list[Artifact]:
    """Who teaches a stage (its row's `teachers` in STAGE_TYPES): "inputs" -> its `from`; "lineage" ->
    `teacher:`, else the teacher of its parent (or the parent itself, when it was trained without one)."""
    stage = cfg.stages[name]
    kind = STAGE_TYPES[stage.type].teachers(stage)
    if kind == "inputs":
        return [artifacts[n] for n in cfg.inputs(name)]
    if kind == "lineage":
        if cfg.extra_inputs(name):
            return [artifacts[n] for n in cfg.extra_inputs(name)]
        parent = artifacts[cfg.inputs(name)[0]]
        names = parent.metrics.get("teachers") or [parent.name]
        return [artifacts[n] for n in names]
    return []


def run_pipeline(cfg: PipelineConfig, *, pipeline_path: Path, runs_dir: Path = Path("runs"),
                 force: tuple[str, ...] = (), log: Callable[[str], None] = print, progress: bool = True,
                 adopt: bool = False) -> Path:
    """Run every stage (or reuse it from cache), benchmark every artifact, write the report; return its dir.

    A run directory belongs to the pipeline file that first ran in it (rundir.check_owner); `adopt`
    lets another pipeline file with the same name take it over.

    Under torchrun, processes other than rank 0 return None once the stages are done.
    """
    started = time.perf_counter()
    check_weights_files(cfg, pipeline_path.parent)  # before anything is written
    run_dir = runs_dir / cfg.name
    device = distributed.init(resolve_device(cfg.device))
    try:
        if not distributed.is_main():
            return _run_locked(cfg, run_dir, pipeline_path, force, lambda m: None, False, started, device)
        rundir.check_owner(run_dir, Path(cfg.report.dir) / cfg.name, pipeline_path, adopt=adopt)  # before any write
        run_dir.mkdir(parents=True, exist_ok=True)
        with run_lock(run_dir):
            return _run_locked(cfg, run_dir, pipeline_path, force, log, progress, started, device)
    finally:
        distributed.shutdown()


def _run_locked(cfg: PipelineConfig, run_dir: Path, pipeline_path: Path, force: tuple[str, ...],
                log: Callable[[str], None], progress: bool, started: float, device: torch.device) -> Path | None:
    from compress.data import build_data
    from compress import stages
    from compress import ensemble
    from compress.stages import benchmark, engine, export, report

    if cfg.tracking is not None:  # a run that could not be logged at the end fails now, before any stage
        tracking.require(cfg.tracking, run_dir.parent)
    from compress.runtime import require_runtimes
    require_runtimes(cfg.benchmark.runtimes)  # an optional runtime the YAML asks for, missing: fail now
    main = distributed.is_main()
    if cfg.benchmark.threads:
        torch.set_num_threads(cfg.benchmark.threads)
    data = build_data(cfg.data, device, cfg.seed, log=log, cache_root=run_dir.parent / ".cache", progress=progress)
    log(f"data: {data.name} from {data.source}: {data.num_train} train / {data.num_val} val / "
        f"{data.num_test} test images, {data.in_channels}x{data.image_size[0]}x{data.image_size[1]}, "
        f"{data.num_classes} classes; device {device}")

    artifacts: dict[str, Artifact] = {}
    stage_times: dict[str, float] = {}
    reused: set[str] = set()
    base_dir = pipeline_path.parent
    for name in cfg.order():
        stage_cfg = cfg.stages[name]
        inputs = [artifacts[n] for n in cfg.inputs(name)]
        teachers = teachers_of(cfg, name, artifacts)
        key = stage_key(cfg, name, inputs + [t for t in teachers if t not in inputs], data.fingerprint, base_dir)
        stage_dir = run_dir / name
        if name not in force:
            cached, why = distributed.broadcast(_cached(stage_dir, key) if main else None)
            if cached is not None:
                artifacts[name] = cached
                stage_times[name] = 0.0
                reused.add(name)
                log(f"[{name}] unchanged since the last run (cache key {key[:12]}): skipped")
                continue
            if why:
                log(f"[{name}] {why}: running it again")
        log(f"[{name}] {stage_cfg.type}" + (f" from {', '.join(a.name for a in inputs)}" if inputs else ""))
        if main:
            stage_dir.mkdir(parents=True, exist_ok=True)
            for leftover in stage_dir.glob(".*.tmp"):  # half-written files of a killed run (we hold the lock)
                leftover.unlink(missing_ok=True)
        distributed.barrier()
        data_parallel = STAGE_TYPES[stage_cfg.type].data_parallel
        if not (main or data_parallel):  # rank 0 runs it; take its artifact
            artifacts[name] = distributed.broadcast(None)
            continue
        # Named by the cache key: a checkpoint of another config is never resumed from (nor deleted before
        # this stage succeeds, so going back to that config can still resume it).
        checkpoint = stage_dir / f"checkpoint-{key[:16]}.pt"
        seed_everything(cfg.seed)
        ctx = Context(run_dir=run_dir, stage_dir=stage_dir, stage_name=name, device=device, seed=cfg.seed,
                      data=data, inputs=inputs, teachers=teachers, artifacts=artifacts, base_dir=base_dir,
                      log=log, progress=progress, checkpoint=checkpoint)
        t0 = time.perf_counter()
        with distributed.training_stage() if data_parallel else nullcontext():
            artifact = stages.runner(stage_cfg.type)(stage_cfg, ctx)
        if not main:  # rank 0 saved the model; it exports and records it, then shares the artifact
            artifacts[name] = distributed.broadcast(None)
            continue
        ctx.artifact = artifact
        artifact = export.run(cfg.export, ctx)
        wall = time.perf_counter() - t0
        artifact.metrics["wall_seconds"] = round(wall, 2)
        stage_times[name] = wall
        artifacts[name] = artifact
        rundir.claim(run_dir, pipeline_path)  # the first finished stage records the run directory's owner
        rundir.write_stage(stage_dir, rundir.StageManifest(
            stage=name, key=key, artifact=artifact,
            config=stage_cfg.model_dump(mode="json", by_alias=True),
            inputs={a.name: {k: sha256_file(v) for k, v in a.files.items()} for a in inputs},
            teachers=[t.name for t in teachers],
            outputs={k: sha256_file(v) for k, v in artifact.files.items()},
            versions=versions(),
            data=data.summary(),  # preprocessing and labels: a run directory alone is deployable
            wall_seconds=round(wall, 2),
            processes=distributed.world() if data_parallel else 1,
            finished=datetime.now(timezone.utc).isoformat(timespec="seconds")))
        for done in stage_dir.glob("checkpoint-*.pt"):  # the manifest now vouches for the result
            done.unlink(missing_ok=True)
        log(f"[{name}] done in {wall:.1f} s")
        distributed.broadcast(artifact)  # to the other processes, if any

    if not main:  # engines, benchmark and report are rank 0's
        return None
    rundir.claim(run_dir, pipeline_path)  # (a run whose stages were all reused from before the record existed)
    ctx = Context(run_dir=run_dir, stage_dir=run_dir, stage_name="benchmark", device=device, seed=cfg.seed,
                  data=data, inputs=list(artifacts.values()), teachers=[], artifacts=artifacts,
                  base_dir=base_dir, log=log, progress=progress)
    ctx.engines = engine.run(cfg.engine, ctx)
    rundir.record_engines(run_dir, ctx.engines)
    t0 = time.perf_counter()
    rows = benchmark.run(cfg.benchmark, ctx)
    ctx.rows = rows + ensemble.rows(ctx, rows, cfg.benchmark.accuracy_split)   # several teachers: their average
    stage_times["benchmark"] = time.perf_counter() - t0
    stage_times["total"] = time.perf_counter() - started
    ctx.stage_times, ctx.pipeline_path, ctx.reused = stage_times, pipeline_path, frozenset(reused)
    report_dir = report.run(cfg, ctx)
    if cfg.tracking is not None:  # after the report is on disk: a tracking failure is a warning, never a lost run
        tracking.log_run(cfg.tracking, report_dir, run_dir.parent, log=log)
    return report_dir
