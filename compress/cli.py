"""The `compress` command: parses, delegates, and turns known failures into one-line errors."""

from __future__ import annotations

import errno
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

import compress

app = typer.Typer(
    name="compress",
    add_completion=False,
    no_args_is_help=True,
    rich_markup_mode="markdown",
    help="""Turn a big, accurate vision model into small, fast ones, and prove the trade-off with numbers.

A pipeline YAML names stages (train a teacher, distill students, prune, quantize); every model
is exported to ONNX, checked, benchmarked on every runtime and summarized in a report.

**Examples**

* `compress run pipelines/distill.yaml` (the default Fashion-MNIST pipeline)
* `compress run pipelines/smoke.yaml --set stages.teacher.epochs=1 --out /tmp/runs`
* `compress validate pipelines/distill.yaml`
* `compress models --input-size 1,28,28`
""",
)
console = Console(stderr=True, highlight=False)
EXIT_BAD_INPUT = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report a Ctrl-C
# Storage problems are the user's to fix (free space, permissions), not bugs: one line, exit 2.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _user_errors() -> tuple[type[BaseException], ...]:
    from compress.config import ConfigError
    from compress.data import DataError
    from compress.io import CheckpointError, WriteError
    from compress.pipeline import RunLockedError
    from compress.registry import ModelError

    return ConfigError, DataError, CheckpointError, ModelError, WriteError, RunLockedError


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {escape(_one_line(message))}", soft_wrap=True)
    raise typer.Exit(code)


@contextmanager
def _sigterm_as_ctrl_c():
    """SIGTERM stops a run the way Ctrl-C does: training checkpoints, the CLI exits 130."""
    def terminate(signum, frame):
        raise KeyboardInterrupt(f"stopped by {signal.Signals(signum).name}")

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"compress {compress.__version__}")
        raise typer.Exit()


@app.callback()
def main(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the version and exit.")) -> None:
    pass


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/distill.yaml"),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Run directory root: stages write to OUT/<name>/<stage>/."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config value: key.path=value (repeatable)."),
    reports: Optional[Path] = typer.Option(None, "--reports", help="Report root (default: report.dir in the YAML, 'reports')."),
    force: list[str] = typer.Option([], "--force", "-f", help="Re-run this stage even if its cache key is unchanged (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (one line per epoch instead)."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with N processes (PyTorch DDP via torchrun): one per GPU, "
                              "or N CPU processes on gloo. Same as `torchrun --nproc-per-node N -m compress run ...`."),
) -> None:
    """Run a pipeline: every stage, then engines, benchmark and report.

    Stages whose config and inputs did not change since the last run in OUT are reused.
    With `--nproc N` the train, distill and prune stages train data-parallel in N processes
    (each takes 1/N of every batch: the global batch size and learning rate stay as written);
    the rest runs in the first process.

    **Examples**

    * `compress run pipelines/distill.yaml`
    * `compress run pipelines/distill.yaml --set stages.teacher.epochs=1 --set data.batch_size=128`
    * `compress run pipelines/distill.yaml --force mnv2-int8`
    * `compress run pipelines/distill.yaml --nproc 2` (DDP: two GPUs, or two CPU processes)
    """
    from compress import config, distributed
    from compress.context import StageError
    from compress.pipeline import run_pipeline

    overrides = list(set_) + ([f"report.dir={reports}"] if reports else [])
    try:
        cfg = config.load(pipeline, overrides)
        unknown = [s for s in force if s not in cfg.stages]
        if unknown:
            _fail(f"--force {unknown[0]!r}: no such stage in {pipeline} (stages: {', '.join(cfg.stages)})")
        if nproc > 1 and not distributed.launched():  # the config is valid: start N copies of this command
            args = ["run", str(pipeline), "--out", str(out), *(a for v in set_ for a in ("--set", v)),
                    *(["--reports", str(reports)] if reports else []), *(a for f in force for a in ("--force", f)),
                    *(["--no-progress"] if no_progress else [])]
            raise typer.Exit(distributed.launch(nproc, args))
        if not distributed.is_main_process():  # under torchrun: rank 0 talks, the others work quietly
            no_progress = True
        with _sigterm_as_ctrl_c():
            report_dir = run_pipeline(cfg, pipeline_path=pipeline, runs_dir=out, force=tuple(force),
                                      log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
                                      progress=not no_progress and sys.stderr.isatty())
    except _user_errors() as exc:
        _fail(str(exc))
    except (StageError, FloatingPointError) as exc:  # the config is valid, the stage could not do it
        _fail(str(exc), code=1)
    except OSError as exc:
        if exc.errno not in DISK_ERRNOS:
            raise
        _fail(f"{str(exc.filename) + ': ' if exc.filename else ''}{exc.strerror or exc}")
    except KeyboardInterrupt as exc:
        message = _one_line(str(exc) or "interrupted")
        if "resume" not in message:
            message += "; finished stages are kept, and the same command continues from there"
        console.print(f"[bold yellow]stopped:[/] {escape(message)}", soft_wrap=True)
        raise typer.Exit(EXIT_INTERRUPTED)
    if report_dir is not None:  # None: a worker process other than rank 0
        console.print(f"[bold green]report:[/] {report_dir / 'report.md'}")


@app.command()
def validate(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML to check."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config value: key.path=value."),
) -> None:
    """Check a pipeline file against the schema and print its stage graph, without running anything.

    **Example:** `compress validate pipelines/distill.yaml`
    """
    from compress import config

    try:
        cfg = config.load(pipeline, list(set_))
    except config.ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"{pipeline}: ok ({cfg.name}, {len(cfg.stages)} stages)")
    for name in cfg.order():
        stage = cfg.stages[name]
        src = cfg.inputs(name)
        what = {"prune": lambda: (f"keep {stage.target_macs or stage.target_params:g} of "
                                  f"{'MACs' if stage.target_macs else 'params'}" if stage.target_latency_ms is None
                                  else f"under {stage.target_latency_ms:g} ms ({stage.latency_runtime})")
                + f", {stage.importance}",
                "quantize": lambda: f"{stage.method} int8 ({stage.backend})"}.get(stage.type, lambda: stage.model)()
        typer.echo(f"  {name:<20} {stage.type:<9} {what:<28} {('<- ' + ', '.join(src)) if src else ''}")


@app.command()
def models(
    pattern: Optional[str] = typer.Argument(None, help="Glob filter, e.g. 'mobilenet*'."),
    input_size: str = typer.Option("1,28,28", "--input-size", help="C,H,W of one input image."),
    num_classes: int = typer.Option(10, "--num-classes", help="Classifier outputs."),
) -> None:
    """List the registered models with parameters and MACs at an input size.

    **Example:** `compress models 'shufflenet*' --input-size 3,32,32`
    """
    from rich.table import Table

    from compress.registry import count_macs, count_params, create_model, list_models, model_family

    try:
        c, h, w = (int(v) for v in input_size.split(","))
    except ValueError:
        _fail(f"--input-size {input_size!r}: expected C,H,W such as 1,28,28")
    table = Table(title=f"models at {c}x{h}x{w}, {num_classes} classes")
    for col in ("model", "family", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("model", "family") else "right")
    for name in list_models(pattern):
        model = create_model(name, num_classes=num_classes, in_channels=c)
        table.add_row(name, model_family(name), f"{count_params(model) / 1e6:.3f} M",
                      f"{count_macs(model, (c, h, w)) / 1e6:.2f} M")
    Console().print(table)



@app.command()
def compare(
    reports: list[Path] = typer.Argument(..., help="Two or more report.json files or report directories; the first is "
                                                   "the baseline."),
    fail_if: list[str] = typer.Option([], "--fail-if", help="Gate, repeatable: accuracy_drop>POINTS, "
                                                            "latency_increase>MS or latency_increase>PCT%."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write an overlaid accuracy-vs-latency plot (PNG)."),
) -> None:
    """Compare reports artifact by artifact (name, runtime, precision): accuracy, p50 latency and deltas.

    Exits 1 when a `--fail-if` gate is violated (one line per gate), 2 on unreadable input.

    **Examples**

    * `compress compare reports/baseline reports/smoke`
    * `compress compare base/report.json new/report.json --fail-if "accuracy_drop>0.5" --fail-if "latency_increase>10%"`
    * `compress compare a b c --plot compare.png`
    """
    from compress import compare as cmp

    try:
        gates = [cmp.parse_gate(g) for g in fail_if]
        result = cmp.compare([cmp.load_report(r) for r in reports])
    except cmp.CompareError as exc:
        _fail(str(exc))
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    out.print(cmp.table(result))
    for line in cmp.legend(result):
        out.print(line, markup=False)
    if result.machine_note:
        out.print(f"[yellow]note:[/] {result.machine_note}")
    if plot:
        out.print(f"plot: {cmp.plot(result, plot)}", markup=False)
    failures = cmp.check_gates(result, gates)
    for line in failures:
        console.print(f"[bold red]gate:[/] {line}", soft_wrap=True, markup=True)
    if failures:
        raise typer.Exit(1)


@app.command()
def deploy(
    source: Path = typer.Argument(..., help="A run directory (runs/NAME), a report directory or a report.json."),
    artifact: str = typer.Option(..., "--artifact", "-a", help="Stage name of the model to ship, e.g. student-int8."),
    target: str = typer.Option(..., "--target", "-t", help="triton, jetson or onnx."),
    out: Path = typer.Option(..., "--out", "-o", help="Bundle directory (created; must be empty unless --force)."),
    precision: Optional[str] = typer.Option(None, "--precision", help="fp32, fp16 or int8 (default: int8 for a "
                                                                      "quantize stage, jetson fp16, else fp32)."),
    runs: Optional[Path] = typer.Option(None, "--runs", help="Where a report's run directory is (default: the "
                                                             "report's run_dir, else runs/)."),
    reports: Path = typer.Option(Path("reports"), "--reports", help="Where a run directory's report is."),
    force: bool = typer.Option(False, "--force", help="Replace a non-empty --out."),
) -> None:
    """Bundle one artifact for serving: the model, manifest.json (preprocessing, labels, hashes) and infer.py.

    **Examples**

    * `compress deploy runs/fashion-distill --artifact mnv2-int8 --target onnx --out dist/mnv2-int8`
    * `compress deploy reports/smoke --artifact student --target triton --out model_repository`
    * `compress deploy reports/smoke --artifact student --target jetson --out dist/jetson`, then on the
      device `./build_engine.sh && python3 infer.py image.png`
    """
    from compress.deploy import DeployError, deploy as make_bundle

    try:
        bundle = make_bundle(source, artifact, target, out, precision=precision, runs=runs, reports=reports,
                             force=force, log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    except (DeployError, *_user_errors()) as exc:
        _fail(str(exc))
    console.print(f"[bold green]bundle:[/] {bundle}")


if __name__ == "__main__":
    app()
