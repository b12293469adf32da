"""Experiment tracking: one MLflow run per `compress run`, logged from the finished report.

`tracking: mlflow` in a pipeline (or `--set tracking=mlflow`) logs, after the report is written:
params, the pipeline config flattened (`stages.teacher.lr`); metrics, per report row
(`accuracy/<artifact>/<runtime>/<precision>`, `size_bytes/...`, `latency_p50_ms/.../batch<b>`),
per artifact (`params/<artifact>`, `macs/<artifact>`) and per stage (`wall_seconds/<stage>`,
`best_accuracy/<stage>`); tags, the machine and library versions; artifacts, the report files.

Everything is read back from report.json, so tracking cannot change what a run computes, and
a run can be logged again later: `python -m compress.tracking reports/<name> [URI]`. A tracking
failure after a successful run is one warning line; the report is already on disk.

The store: MLflow 3 defaults to SQLite and refuses the old `./mlruns` file store unless
MLFLOW_ALLOW_FILE_STORE=true, so with no `tracking.uri` (and no $MLFLOW_TRACKING_URI) runs go
to `sqlite:///<--out>/mlflow.db`, files to `<--out>/mlartifacts/`: no server needed.
"""

from __future__ import annotations

import json
import logging
import os
import re
import sys
import time
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Callable

from compress import install_hint
from compress.config import ConfigError, TrackingConfig

DB_NAME = "mlflow.db"
ARTIFACTS_DIR = "mlartifacts"
REPORT_FILES = ("report.json", "report.md", "report.html", "pareto.png")
INSTALL_HINT = install_hint("tracking")


def resolve_uri(cfg: TrackingConfig, runs_root: Path) -> str:
    """The YAML's uri, else $MLFLOW_TRACKING_URI, else a SQLite file beside the run directories."""
    uri = cfg.uri or os.environ.get("MLFLOW_TRACKING_URI")
    return uri or f"sqlite:///{(Path(runs_root) / DB_NAME).resolve().as_posix()}"


def _is_file_store(uri: str) -> bool:
    return uri.startswith("file:") or ("://" not in uri and not uri.startswith("databricks"))


def require(cfg: TrackingConfig, runs_root: Path) -> None:
    """Fail before any stage runs when the run could not be logged at the end (ConfigError, one line)."""
    uri = resolve_uri(cfg, runs_root)
    needed = ["mlflow"] + (["sqlalchemy", "alembic"] if uri.startswith("sqlite:") else [])
    for module in needed:
        try:
            __import__(module)
        except ImportError as exc:
            raise ConfigError(f"tracking: {cfg.backend} needs the {module!r} package, which is not installed "
                              f"({exc}); install it with {INSTALL_HINT}, or remove 'tracking'") from None
    if _is_file_store(uri) and os.environ.get("MLFLOW_ALLOW_FILE_STORE", "").lower() not in ("true", "1"):
        raise ConfigError(f"tracking.uri {uri!r}: MLflow 3 refuses the file store unless MLFLOW_ALLOW_FILE_STORE=true "
                          f"is set; use a sqlite:///path/mlflow.db URI (the default) or a server URL")


def flatten(config: dict, prefix: str = "") -> dict[str, str]:
    """{"stages": {"teacher": {"lr": 0.1}}} -> {"stages.teacher.lr": "0.1"}; values as in JSON (null, true)."""
    out: dict[str, str] = {}
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[_key(name)] = value if isinstance(value, str) else json.dumps(value)
    return out


def _key(name: str) -> str:
    # MLflow keys: letters, digits, _ - . / space and colon; stage names may hold anything else but '/'.
    return re.sub(r"[^\w.\-/ :]", "_", name)


def metrics_of(report: dict) -> dict[str, float]:
    """The numbers worth comparing across runs, from a report.json (see module docstring for the keys)."""
    metrics: dict[str, float] = {}

    def put(key: str, value) -> None:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            metrics[_key(key)] = float(value)

    for row in report.get("artifacts", []):
        name = row["name"]
        put(f"params/{name}", row.get("params"))
        put(f"macs/{name}", row.get("macs"))
        if row.get("status") != "ok":
            continue
        where = f"{name}/{row['runtime']}/{row['precision']}"
        put(f"accuracy/{where}", row.get("accuracy"))
        put(f"size_bytes/{where}", row.get("size_bytes"))
        for batch, lat in (row.get("latency_ms") or {}).items():
            put(f"latency_p50_ms/{where}/batch{batch}", lat.get("p50"))
    for stage, info in report.get("stages", {}).items():
        put(f"best_accuracy/{stage}", info.get("best_accuracy"))
    for stage, seconds in report.get("wall_seconds", {}).items():
        put(f"wall_seconds/{stage}", seconds)
    return metrics


def tags_of(report: dict) -> dict[str, str]:
    machine = dict(report.get("machine") or {})
    versions = machine.pop("versions", {}) or {}
    tags = {f"machine.{k}": "none" if v is None else str(v) for k, v in machine.items()}
    tags.update({f"version.{k}": "none" if v is None else str(v) for k, v in versions.items()})
    tags.update({"compress.pipeline_file": report["pipeline"].get("file", ""),
                 "compress.run_dir": str(report.get("run_dir", "")),
                 "compress.report_created": report.get("created", "")})
    return {_key(k): v for k, v in tags.items()}


@contextmanager
def _quiet_mlflow():
    """MLflow logs at INFO while it creates a SQLite store; the run's own log says what happened."""
    logger = logging.getLogger("mlflow")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


def log_report(cfg: TrackingConfig, report_dir: Path, runs_root: Path) -> tuple[str, str, str]:
    """Log one MLflow run from `report_dir` (report.json and its files); return (URI, experiment, run id)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    report_dir = Path(report_dir)
    report = json.loads((report_dir / "report.json").read_text())
    name = report["pipeline"]["name"]
    uri = resolve_uri(cfg, runs_root)
    with _quiet_mlflow():
        client = MlflowClient(tracking_uri=uri)
        experiment_name = cfg.experiment or name
        experiment = client.get_experiment_by_name(experiment_name)
        if experiment is not None:
            experiment_id = experiment.experiment_id
        else:
            # A local SQLite store keeps its files beside the database (MLflow's own default is ./mlruns
            # under whatever the working directory happens to be); a server decides for itself.
            location = None
            if uri.startswith("sqlite:///"):
                location = (Path(uri[len("sqlite:///"):]).parent / ARTIFACTS_DIR).resolve().as_uri()
            experiment_id = client.create_experiment(experiment_name, artifact_location=location)
        run = client.create_run(experiment_id, run_name=name, tags=tags_of(report))
        run_id = run.info.run_id
        try:
            now = int(time.time() * 1000)
            client.log_batch(run_id, params=[Param(k, v) for k, v in flatten(report["pipeline"]["config"]).items()])
            client.log_batch(run_id, metrics=[Metric(k, v, now, 0) for k, v in metrics_of(report).items()],
                             tags=[RunTag("mlflow.note.content", f"compress report of `{name}`: {report_dir}")])
            for file in REPORT_FILES:
                if (report_dir / file).is_file():
                    client.log_artifact(run_id, str(report_dir / file))
        except BaseException:
            with suppress(Exception):  # the error that stopped us is the one to report
                client.set_terminated(run_id, status="FAILED")
            raise
        client.set_terminated(run_id)
    return uri, experiment_name, run_id


def log_run(cfg: TrackingConfig, report_dir: Path, runs_root: Path, log: Callable[[str], None] = print) -> str | None:
    """log_report for the runner: never raises (the run's results are on disk already); the run id or None."""
    try:
        uri, experiment, run_id = log_report(cfg, report_dir, runs_root)
    except Exception as exc:
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        log(f"warning: tracking: not logged to {cfg.backend} ({type(exc).__name__}: {first}); the report in "
            f"{report_dir} is complete; log it later with `python -m compress.tracking {report_dir} [URI]`")
        return None
    log(f"tracking: MLflow run {run_id} in experiment {experiment!r} at {uri}")
    return run_id


def main(argv: list[str]) -> int:
    """`python -m compress.tracking REPORT_DIR [URI]`: log (again) a finished report."""
    if not argv or argv[0] in ("-h", "--help"):
        print(main.__doc__)
        return 0 if argv else 2
    report_dir = Path(argv[0])
    try:
        report = json.loads((report_dir / "report.json").read_text())
        cfg = TrackingConfig.model_validate(report["pipeline"]["config"].get("tracking") or "mlflow")
        if len(argv) > 1:
            cfg = cfg.model_copy(update={"uri": argv[1]})
        runs_root = Path(report.get("run_dir") or "runs/x").parent
        require(cfg, runs_root)
    except (OSError, ValueError, KeyError, ConfigError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0 if log_run(cfg, report_dir, runs_root, log=lambda m: print(m, file=sys.stderr)) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
