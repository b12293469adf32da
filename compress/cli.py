"""The `compress` command: parses, delegates, and turns known failures into one-line errors."""

from __future__ import annotations

import errno
import os
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

CRASH_DIR_ENV = "COMPRESS_CRASH_DIR"  # where tracebacks and library warnings go (default: $TMPDIR/compress-<uid>)


def _crash_dir() -> Path:
    import tempfile

    default = Path(tempfile.gettempdir()) / f"compress-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
    return Path(os.environ.get(CRASH_DIR_ENV) or default)


WARNINGS_LOG: list[Path] = []  # where library warnings go now: the run's warnings.log during `run`


@contextmanager
def _warnings_log(path: Path):
    """Send library warnings to `path` (created on the first warning) while the block runs."""
    WARNINGS_LOG.append(path)
    try:
        yield
    finally:
        WARNINGS_LOG.pop()


@contextmanager
def _library_warnings_to(path: Path):
    """Python warnings and library log records (PIL, matplotlib, torch) go to a file, not the terminal:
    `path`, or the innermost `_warnings_log` path."""
    import logging
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):
        target = WARNINGS_LOG[-1] if WARNINGS_LOG else path
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            with open(target, "a", encoding="utf-8") as handle:
                handle.write(warnings.formatwarning(message, category, filename, lineno, line))
        except OSError:
            pass  # a warning that cannot be logged is dropped, never printed over the one-line output

    class ToFile(logging.Handler):
        def emit(self, record):
            show(self.format(record), UserWarning, record.pathname, record.lineno)

    root = logging.getLogger()
    log_handler = ToFile(level=logging.WARNING)
    previous = warnings.showwarning
    warnings.showwarning = show
    root.addHandler(log_handler)
    try:
        yield
    finally:
        warnings.showwarning = previous
        root.removeHandler(log_handler)


def _broken_pipe(exc: BaseException) -> bool:
    """Did the reader of our stdout go away? Directly, or as typer reports it: sys.exit(1) while
    handling an EPIPE."""
    seen = exc
    for _ in range(3):
        if isinstance(seen, OSError) and seen.errno == errno.EPIPE:
            return True
        seen = seen.__context__
        if seen is None:
            return False
    return False


def _quiet_stdout() -> None:
    """The reader of our stdout has gone: point stdout at /dev/null so that the interpreter's final
    flush cannot raise again (the recipe in Python's signal documentation)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):
        pass


class _Boundary(typer.core.TyperGroup):
    """The CLI boundary: whatever happens inside a command, the user sees at most one line on stderr.

    Usage errors are one `error:` line (exit 2), not click's box; an unexpected exception is one line
    naming it and the file holding its traceback (exit 1); sys.exit() called by a user module or a
    library cannot end a command silently (exit 1); library warnings go to a log file.
    """

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        from typer._click.exceptions import NoArgsIsHelpError, UsageError  # typer's own copy of click
        from typer.exceptions import Abort, TyperException

        argv = list(sys.argv[1:] if args is None else args)
        command = next((a for a in argv if a in self.commands), "compress")
        try:
            with _library_warnings_to(_crash_dir() / "warnings.log"):
                code = super().main(argv, prog_name, complete_var, standalone_mode=False, **extra)
                sys.stdout.flush()  # a reader gone away shows here, not in the interpreter's exit
            code = code if isinstance(code, int) else 0
        except NoArgsIsHelpError as exc:
            typer.echo(exc.format_message())  # `compress` alone: the help text, as before
            code = exc.exit_code
        except TyperException as exc:
            hint = f" (see `compress {command} --help`)" if isinstance(exc, UsageError) else ""
            console.print(f"[bold red]error:[/] {escape(_cut(_one_line(exc.format_message()), 400))}{hint}",
                          soft_wrap=True)
            code = exc.exit_code
        except Abort:
            console.print("[bold yellow]stopped:[/] interrupted", soft_wrap=True)
            code = EXIT_INTERRUPTED
        except (BrokenPipeError, SystemExit) as exc:
            if not _broken_pipe(exc):  # a SystemExit is never ours (commands end with typer.Exit)
                console.print(f"[bold red]error:[/] `compress {command}` was ended by sys.exit({exc.code!r}) from "
                              f"{_exit_origin(exc)}; nothing it would have written was written", soft_wrap=True)
                code = 1
            else:  # `compress validate x.yaml | head -1`: the reader has what it wanted; no error line
                _quiet_stdout()
                code = EXIT_BROKEN_PIPE
        except KeyboardInterrupt:
            console.print("[bold yellow]stopped:[/] interrupted", soft_wrap=True)
            code = EXIT_INTERRUPTED
        except Exception as exc:  # a bug, or a case we did not foresee: one line, the traceback in a file
            console.print(f"[bold red]error:[/] {escape(_crash_line(command, exc))}", soft_wrap=True)
            code = 1
        if not standalone_mode:
            return code
        sys.exit(code)


def _exit_origin(exc: BaseException) -> str:
    import traceback

    frames = traceback.extract_tb(exc.__traceback__)
    return f"{frames[-1].filename}:{frames[-1].lineno}" if frames else "unknown code"


def _crash_line(command: str, exc: BaseException) -> str:
    """One line for an unexpected exception; its full traceback goes to a file the line names."""
    import time
    import traceback

    what = f"{type(exc).__name__}: {_cut(_one_line(str(exc)), 200)}" if str(exc) else type(exc).__name__
    if isinstance(exc, MemoryError):
        what = "out of memory (MemoryError); try smaller sizes (batch_size, image_size, dataset)"
    try:
        directory = _crash_dir()
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"traceback-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.txt"
        path.write_text(f"compress {compress.__version__}: {' '.join(sys.argv)}\n"
                        + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        where = f"full traceback in {path}"
    except OSError as err:
        where = f"the traceback could not be written ({err.strerror or err})"
    return f"`compress {command}` failed unexpectedly: {what}; {where}"


def _cut(text: str, limit: int = 200) -> str:
    """At most `limit` characters: a value echoed in an error never floods the terminal."""
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _flag_shows_no_type(display_type_rich):
    """Typer's help prints `<bool>` next to an on/off flag as if it took a value; it takes none."""
    def display(self, ctx):
        return None if getattr(self, "is_bool_flag", False) else display_type_rich(self, ctx)
    return display


# A typer without this method (the H200 image's older one) renders types its own way: leave it be.
if hasattr(typer.core.TyperOption, "display_type_rich"):
    typer.core.TyperOption.display_type_rich = _flag_shows_no_type(typer.core.TyperOption.display_type_rich)

app = typer.Typer(
    name="compress",
    cls=_Boundary,
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
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, as shells report a process whose reader went away
# Storage problems are the user's to fix (free space, permissions), not bugs: one line, exit 2.
DISK_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def _user_errors() -> tuple[type[BaseException], ...]:
    from compress.config import ConfigError
    from compress.data import DataError
    from compress.io import CheckpointError, WriteError
    from compress.pipeline import RunLockedError
    from compress.registry import ModelError
    from compress.rundir import RunDirError

    return ConfigError, DataError, CheckpointError, ModelError, WriteError, RunLockedError, RunDirError


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> None:
    console.print(f"[bold red]error:[/] {escape(_cut(_one_line(message), 1000))}", soft_wrap=True)
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


def _endpoint_ok(endpoint: str) -> bool:
    host, _, port = endpoint.rpartition(":")
    return bool(host) and port.isdigit() and 0 < int(port) < 65536


@app.command()
def run(
    pipeline: Path = typer.Argument(..., help="Pipeline YAML, e.g. pipelines/distill.yaml"),
    out: Path = typer.Option(Path("runs"), "--out", "-o", help="Run directory root: stages write to `OUT/<name>/<stage>/`."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a config value: key.path=value (repeatable)."),
    reports: Optional[Path] = typer.Option(None, "--reports", help="Report root (default: report.dir in the YAML, 'reports')."),
    force: list[str] = typer.Option([], "--force", "-f", help="Re-run this stage even if its cache key is unchanged (repeatable)."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars (one line per epoch instead)."),
    adopt: bool = typer.Option(False, "--adopt", help="Take over OUT/<name> (and its report directory) even though "
                               "another pipeline file with the same name ran there."),
    nproc: int = typer.Option(1, "--nproc", min=1, help="Train with N processes (PyTorch DDP via torchrun): one per GPU, "
                              "or N CPU processes on gloo. Same as `torchrun --nproc-per-node N -m compress run ...`."),
    nnodes: int = typer.Option(1, "--nnodes", min=1, help="Train over this many machines (run the same command on "
                               "each, with its --node-rank and the same --rdzv-endpoint), as torchrun --nnodes."),
    node_rank: int = typer.Option(0, "--node-rank", min=0, help="This machine's rank, 0 .. nnodes-1 (node 0 "
                                  "hosts the rendezvous and writes the run directory and report)."),
    rdzv_endpoint: Optional[str] = typer.Option(None, "--rdzv-endpoint", help="HOST:PORT of node 0, reachable "
                                                "from every node (several nodes)."),
    rdzv_backend: str = typer.Option("static", "--rdzv-backend", help="static (node ranks as given, torchrun's "
                                     "default) or c10d (nodes join in any order, ranks assigned)."),
    rdzv_id: str = typer.Option("none", "--rdzv-id", help="Job id, the same on every node (torchrun's --rdzv-id)."),
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
    * `compress run big.yaml --nproc 8 --nnodes 2 --node-rank 0 --rdzv-endpoint node0:29400` on node 0, and
      the same with `--node-rank 1` on node 1
    """
    from compress import config, distributed
    from compress.context import StageError
    from compress.pipeline import run_pipeline

    overrides = list(set_) + ([f"report.dir={reports}"] if reports else [])
    try:
        cfg = config.load(pipeline, overrides)
        config.check_machine(cfg, pipeline)
        for flag, where in (("--out", out), ("--reports", Path(cfg.report.dir))):
            if where.exists() and not where.is_dir() or any(p.is_file() for p in where.parents):
                _fail(f"{flag} {where}: {'it' if where.exists() else 'a parent'} is a file, not a directory")
        unknown = [s for s in force if s not in cfg.stages]
        if unknown:
            _fail(f"--force {unknown[0]!r}: no such stage in {pipeline} (stages: {', '.join(cfg.stages)})")
        if nnodes > 1 and not rdzv_endpoint:
            _fail(f"--nnodes {nnodes}: every node needs --rdzv-endpoint HOST:PORT (of node 0)")
        if node_rank >= nnodes:
            _fail(f"--node-rank {node_rank}: expected 0 .. {nnodes - 1} for --nnodes {nnodes}")
        if rdzv_endpoint and not _endpoint_ok(rdzv_endpoint):
            _fail(f"--rdzv-endpoint {rdzv_endpoint!r}: expected HOST:PORT, e.g. node0:29400")
        if rdzv_backend not in ("static", "c10d"):
            _fail(f"--rdzv-backend {rdzv_backend!r}: expected static or c10d")
        if (nproc > 1 or nnodes > 1) and not distributed.launched():  # the config is valid: start the processes
            args = ["run", str(pipeline), "--out", str(out), *(a for v in set_ for a in ("--set", v)),
                    *(["--reports", str(reports)] if reports else []), *(a for f in force for a in ("--force", f)),
                    *(["--no-progress"] if no_progress else []), *(["--adopt"] if adopt else [])]
            raise typer.Exit(distributed.launch(nproc, args, nnodes=nnodes, node_rank=node_rank,
                                                rdzv_endpoint=rdzv_endpoint, rdzv_backend=rdzv_backend,
                                                rdzv_id=rdzv_id))
        if not distributed.is_main_process():  # under torchrun: rank 0 talks, the others work quietly
            no_progress = True
        with _sigterm_as_ctrl_c(), _warnings_log(out / cfg.name / "warnings.log"):
            report_dir = run_pipeline(cfg, pipeline_path=pipeline, runs_dir=out, force=tuple(force),
                                      log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
                                      progress=not no_progress and sys.stderr.isatty(), adopt=adopt)
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
        config.check_machine(cfg, pipeline)
    except config.ConfigError as exc:
        _fail(str(exc))
    typer.echo(f"{pipeline}: ok ({cfg.name}, {len(cfg.stages)} stages)")
    for name in cfg.order():
        stage = cfg.stages[name]
        src = cfg.inputs(name)
        what = config.STAGE_TYPES[stage.type].describe(stage)
        typer.echo(f"  {name:<20} {stage.type:<9} {what:<28} {('<- ' + ', '.join(src)) if src else ''}")


@app.command()
def init(
    model: str = typer.Argument(..., help="Registry name (see `compress models`) or path/to/file.py:ClassName."),
    data: Path = typer.Option(..., "--data", "-d", help="Image folder: `train/<class>/*.jpg`, optional `test/`."),
    weights: Optional[Path] = typer.Option(None, "--weights", "-w", help="Trained weights (.pt/.pth state_dict, "
                                           ".safetensors, a checkpoint, or a compress model.pt)."),
    output: Path = typer.Option(Path("pipeline.yaml"), "--output", "-o", help="Where to write the pipeline "
                                "(never overwritten)."),
) -> None:
    """Write a commented starter pipeline for a model you already have: import it (or train it), distill it
    into a student, prune, quantize and benchmark; validated before it is written.

    **Example:** `compress init resnet18 --weights resnet18.pth --data images/ -o pipeline.yaml`
    """
    from compress.scaffold import InitError, init as write_starter

    try:
        command = write_starter(model, weights, data, output)
    except (InitError, *_user_errors()) as exc:
        _fail(str(exc))
    typer.echo(f"wrote {output}; run it with:\n  {command}")


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
        _fail(f"--input-size {_cut(input_size, 40)!r}: expected C,H,W such as 1,28,28")
    if not (1 <= c <= 64 and 1 <= h <= 4096 and 1 <= w <= 4096):
        _fail(f"--input-size {input_size}: expected 1-64 channels and 1-4096 pixels a side")
    if not 1 <= num_classes <= 100_000:
        _fail(f"--num-classes {num_classes}: expected 1 to 100000")
    table = Table(title=f"models at {c}x{h}x{w}, {num_classes} classes")
    for col in ("model", "family", "params", "MACs"):
        table.add_column(col, justify="left" if col in ("model", "family") else "right")
    for name in list_models(pattern):
        model = create_model(name, num_classes=num_classes, in_channels=c)
        try:
            macs = f"{count_macs(model, (c, h, w)) / 1e6:.2f} M"
        except (RuntimeError, ValueError):  # e.g. an input too small for its downsampling
            macs = f"n/a at {h}x{w}"
        table.add_row(name, model_family(name), f"{count_params(model) / 1e6:.3f} M", macs)
    Console().print(table)



@app.command()
def compare(
    reports: list[Path] = typer.Argument(..., help="Two or more report.json files or report directories; the first is "
                                                   "the baseline."),
    fail_if: list[str] = typer.Option([], "--fail-if", help="Gate, repeatable: accuracy_drop>POINTS, "
                                                            "latency_increase>MS or latency_increase>PCT%."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write an overlaid accuracy-vs-latency plot (PNG)."),
    include_mismatched: bool = typer.Option(False, "--include-mismatched",
                                            help="Also show (and gate) deltas of rows whose model or dataset differ."),
) -> None:
    """Compare reports artifact by artifact (name, runtime, precision): accuracy, p50 latency and deltas,
    and the machines they were measured on.

    Warns when the pipelines, datasets or models differ; rows whose model or dataset differ get no
    deltas (and no gate reads them) unless `--include-mismatched`. Exits 1 when a `--fail-if` gate is violated (one line per gate), 2 on unreadable input.

    **Examples**

    * `compress compare reports/reference/fashion-distill reports/fashion-distill`
    * `compress compare base/report.json new/report.json --fail-if "accuracy_drop>0.5" --fail-if "latency_increase>10%"`
    * `compress compare a b c --plot compare.png`
    """
    from compress import compare as cmp

    try:
        gates = [cmp.parse_gate(g) for g in fail_if]
        if plot is not None:  # before any work: a plot path that cannot be written is a usage error
            cmp.check_plot_path(plot)
        result = cmp.compare([cmp.load_report(r) for r in reports], include_mismatched=include_mismatched)
    except cmp.CompareError as exc:
        _fail(str(exc))
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 200)
    out.print(cmp.table(result))
    for line in cmp.legend(result):
        out.print(line, markup=False)
    out.print(cmp.machine_table(result))
    for line in result.warnings:
        out.print("[yellow]warning:[/] ", end="")
        out.print(line, markup=False)
    if result.machine_note:
        out.print(f"[yellow]note:[/] {result.machine_note}")
    if plot:
        try:
            out.print(f"plot: {cmp.plot(result, plot)}", markup=False)
        except _user_errors() as exc:  # e.g. WriteError: the disk filled up while saving it
            _fail(str(exc))
    failures = cmp.check_gates(result, gates)
    for line in failures:
        console.print(f"[bold red]gate:[/] {line}", soft_wrap=True, markup=True)
    if failures:
        raise typer.Exit(1)


@app.command()
def sweep(
    sweep_file: Path = typer.Argument(..., help="Sweep YAML: pipeline, space, sampler, trials, objectives."),
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep directory (default: sweeps/NAME, NAME the sweep file's stem): "
                                       "trials.jsonl, runs/, trials/ and the combined report."),
    objective: list[str] = typer.Option([], "--objective", help="Replace the file's objectives, repeatable: "
                                        "'max accuracy s.t. latency_p50@1<0.3ms', 'min size_bytes s.t. accuracy>90'."),
    trials: Optional[int] = typer.Option(None, "--trials", min=1, help="Override the trial budget."),
    time_budget: Optional[float] = typer.Option(None, "--time-budget", min=1, help="Start no trial after this many seconds."),
    jobs: Optional[int] = typer.Option(None, "--jobs", "-j", min=1, help="Trials in parallel processes."),
) -> None:
    """Run a pipeline over a search space and report the Pareto front and the best trial per objective.

    Every stage whose cache key is unchanged between trials is reused; a killed sweep, run
    again with the same file and `--out`, skips the trials it finished. Columns for objectives:
    accuracy, latency_p50@B, throughput@B (B: a benchmarked batch size), size_bytes, params, macs.

    **Examples**

    * `compress sweep pipelines/sweeps/prune-quant.yaml`
    * `compress sweep pipelines/sweeps/prune-quant.yaml --objective "max accuracy s.t. latency_p50@1<0.3ms"`
    """
    from compress import sweep as sw

    try:
        cfg, pipeline, pcfg = sw.load(sweep_file)
        updates = {k: v for k, v in (("objectives", objective or None), ("trials", trials),
                                     ("time_budget_s", time_budget), ("jobs", jobs)) if v is not None}
        if updates:
            cfg = sw.SweepConfig.model_validate({**cfg.model_dump(), **updates})
        runner = sw.Sweep(cfg, pipeline, pcfg, out or Path("sweeps") / sweep_file.stem,
                          echo=lambda m: console.print(m, markup=False, soft_wrap=True))
    except sw.SweepError as exc:
        _fail(str(exc))
    except sw.ValidationError as exc:
        _fail(f"{sweep_file}: {exc.errors()[0]['loc'][0]}: {exc.errors()[0]['msg']}")
    with _sigterm_as_ctrl_c():
        done = runner.run()
    batch = min(pcfg.benchmark.batch_sizes)
    result = sw.combined_report(done, runner.objectives, cfg, pipeline, runner.out, batch, runner.scope)
    for b in result["best"]:
        line = (f"best for '{b['objective']}': no trial meets it" if b.get("trial") is None else
                f"best for '{b['objective']}': trial {b['trial']} {b['artifact']} ({b['runtime']} {b['precision']}) "
                f"= {b['value']:.4g}")
        typer.echo(line)
    typer.echo(f"report: {runner.out / 'sweep.md'}")
    if not any(t.status == "ok" for t in done):
        raise typer.Exit(1)


@app.command()
def deploy(
    source: Path = typer.Argument(..., help="A run directory (runs/NAME), a report directory or a report.json."),
    artifact: str = typer.Option(..., "--artifact", "-a", help="Stage name of the model to ship, e.g. student-int8."),
    target: str = typer.Option(..., "--target", "-t", help="triton, jetson, onnx or openvino (CPU: IR + infer.py)."),
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
    * `compress deploy runs/fashion-distill --artifact shuf-int8 --target openvino --out dist/shuf-ov`
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


@app.command()
def serve(
    bundle: Path = typer.Argument(..., help="A bundle directory written by `compress deploy` (onnx, jetson, openvino, "
                                            "or a triton repository with one model)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0: every interface)."),
    port: int = typer.Option(8000, "--port", "-p", help="TCP port; 0 picks a free one (printed at start)."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Requests run in parallel, each worker with "
                                                                        "its own runtime session (default: the cores, "
                                                                        "at most 8)."),
    max_upload_mb: float = typer.Option(10.0, "--max-upload-mb", help="Largest request body accepted (413 above)."),
    max_batch: int = typer.Option(64, "--max-batch", help="Most images in one request."),
    strict: bool = typer.Option(False, "--strict", help="Refuse images of another size or channel count (422) "
                                                        "instead of converting them as infer.py does."),
    runtime: str = typer.Option("auto", "--runtime", help="onnxruntime or openvino (auto: openvino for an openvino "
                                                          "bundle, else onnxruntime)."),
) -> None:
    """Serve a deploy bundle over HTTP: POST /predict, GET /health, GET /metrics, and a page at /.

    The bundle's files are checked against its manifest's sha256 before the server starts.

    **Examples**

    * `compress serve dist/mnv2-int8`, then open http://127.0.0.1:8000/
    * `curl -F image=@shoe.png http://127.0.0.1:8000/predict`
    * `curl --data-binary @shoe.png -H 'Content-Type: image/png' 'http://127.0.0.1:8000/predict?top_k=3'`
    """
    from compress.serve import BundleError, serve as run_server

    try:
        run_server(bundle, host=host, port=port, workers=workers, max_upload_mb=max_upload_mb, max_batch=max_batch,
                   strict=strict, runtime=runtime,
                   log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True))
    except BundleError as exc:
        _fail(str(exc))


if __name__ == "__main__":
    app()
