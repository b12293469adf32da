"""`compress sweep`: run one pipeline many times over a search space, and find the best recipe.

A sweep file names a pipeline, a space of config overrides (each key a `--set` path, each
value a list of choices; a choice that is a mapping sets several keys under the path at once,
so "PTQ with NNCF" and "QAT" can be one axis), a sampler (grid, random, or Optuna's TPE), a
budget in trials and seconds, and objectives such as `max accuracy s.t. latency_p50@1<0.3ms`.

Each trial is one `compress run` in a child process (a crash or a kill ends the trial, not the
sweep) against one shared run directory, so every stage whose cache key did not change since
the previous trial (the teacher, the students the space does not touch) is reused, as the
pipeline reuses it between two runs; grid order changes the last axis fastest, so put the
axes that retrain the most first. With `jobs: N` trials run in N processes, each with its own
run directory seeded from the first finished trial's.

Finished trials go to `trials.jsonl` in the sweep directory, one line each, appended whole;
a killed sweep, run again, skips them and carries on. The combined report (sweep.json,
sweep.md, pareto.png) puts every trial's artifacts on one accuracy-vs-latency plot with the
Pareto front across trials, a table of the trials' settings and results, and the best trial
per objective (Bergstra et al., NeurIPS 2011, "Algorithms for Hyper-Parameter Optimization",
for TPE; Optuna's implementation is used as is).
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

LEDGER = "trials.jsonl"
COLUMNS = ("accuracy", "latency_p50", "throughput", "size_bytes", "params", "macs")  # @B for the batch ones
_UNITS = {"ms": 1.0, "s": 1000.0, "us": 0.001, "b": 1.0, "kb": 1e3, "mb": 1e6, "gb": 1e9, "%": 1.0, "": 1.0}


class SweepError(ValueError):
    """A bad sweep file, space or objective: one line for the user, before any trial runs."""


class SweepConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    pipeline: Path = Field(description="the pipeline YAML to run, relative to the sweep file")
    space: dict[str, list[Any]] = Field(description="`--set` path -> list of choices (a mapping sets several keys)")
    sampler: Literal["grid", "random", "tpe"] = Field("grid", description="tpe needs optuna (the sweep extra)")
    trials: int = Field(100, ge=1, le=10_000, description="stop after this many trials (grid: at most all points)")
    time_budget_s: float | None = Field(None, gt=0, allow_inf_nan=False,
                                        description="start no trial after this many seconds")
    seed: int = Field(0, ge=0, le=2**32 - 1, description="random / tpe sampler seed")
    jobs: int = Field(1, ge=1, le=64, description="trials run in this many processes at once")
    objectives: list[str] = Field(default_factory=lambda: ["max accuracy"],
                                  description="e.g. 'max accuracy s.t. latency_p50@1<0.3ms'; the first drives tpe")

    @field_validator("space")
    @classmethod
    def _space(cls, space: dict) -> dict:
        if not space:
            raise ValueError("the search space is empty; give at least one key with a list of choices")
        for key, choices in space.items():
            if not choices:
                raise ValueError(f"{key}: no choices; give a non-empty list")
        return space


@dataclass(frozen=True)
class Objective:
    """`max|min COLUMN[@BATCH] [s.t. COLUMN[@BATCH] OP NUMBER[UNIT] [and ...]]`."""

    text: str
    sense: str                                  # max | min
    column: str                                 # e.g. accuracy, latency_p50@1
    constraints: tuple[tuple[str, str, float], ...] = ()

    def value(self, row: dict) -> float | None:
        return column_value(row, self.column)

    def feasible(self, row: dict) -> bool:
        for col, op, bound in self.constraints:
            v = column_value(row, col)
            if v is None or not {"<": v < bound, "<=": v <= bound, ">": v > bound, ">=": v >= bound}[op]:
                return False
        return True

    def best(self, rows: list[dict]) -> dict | None:
        ok = [r for r in rows if self.feasible(r) and self.value(r) is not None]
        if not ok:
            return None
        return (max if self.sense == "max" else min)(ok, key=self.value)


_TERM = r"([a-z_0-9]+(?:@\d+)?)"
_OBJ = re.compile(rf"^\s*(max|min)\s+{_TERM}\s*(?:(?:s\.t\.|st|subject to)\s+(.+))?$", re.I)
_CON = re.compile(rf"^\s*{_TERM}\s*(<=|>=|<|>)\s*([0-9.eE+-]+)\s*([a-zA-Z%]*)\s*$")


def _check_column(col: str, batches: list[int], text: str) -> None:
    name, _, batch = col.partition("@")
    if name not in COLUMNS:
        raise SweepError(f"objective {text!r}: unknown column {name!r}; columns: {', '.join(COLUMNS)}")
    if name in ("latency_p50", "throughput"):
        if not batch:
            raise SweepError(f"objective {text!r}: {name} needs a batch size, e.g. {name}@{batches[0]}")
        if int(batch) not in batches:
            raise SweepError(f"objective {text!r}: batch {batch} is not benchmarked by the pipeline "
                             f"(benchmark.batch_sizes: {batches})")
    elif batch:
        raise SweepError(f"objective {text!r}: {name} takes no @batch")


def parse_objective(text: str, batches: list[int]) -> Objective:
    m = _OBJ.match(text)
    if not m:
        raise SweepError(f"objective {text!r}: expected 'max|min COLUMN [s.t. COLUMN<VALUE [and ...]]', "
                         f"e.g. 'max accuracy s.t. latency_p50@1<0.3ms'")
    sense, column, rest = m.group(1).lower(), m.group(2).lower(), m.group(3)
    _check_column(column, batches, text)
    constraints = []
    for part in re.split(r"\s+and\s+|,", rest or "") if rest else []:
        c = _CON.match(part)
        if not c:
            raise SweepError(f"objective {text!r}: cannot read the constraint {part.strip()!r}; "
                             f"expected e.g. latency_p50@1<0.3ms")
        col, op, num, unit = c.group(1).lower(), c.group(2), c.group(3), c.group(4).lower()
        _check_column(col, batches, text)
        if unit not in _UNITS:
            raise SweepError(f"objective {text!r}: unknown unit {unit!r}")
        try:
            bound = float(num) * _UNITS[unit]
        except ValueError:
            raise SweepError(f"objective {text!r}: {num!r} is not a number") from None
        if not math.isfinite(bound):
            raise SweepError(f"objective {text!r}: the bound must be finite")
        constraints.append((col, op, bound))
    return Objective(text.strip(), sense, column, tuple(constraints))


def column_value(row: dict, col: str) -> float | None:
    """A report row's value for a column (latency in ms, size in bytes), or None when it has none."""
    name, _, batch = col.partition("@")
    if row.get("status") != "ok":
        return None
    if name == "latency_p50":
        v = (row.get("latency_ms") or {}).get(batch) or {}
        v = v.get("p50") if isinstance(v, dict) else None
    elif name == "throughput":
        v = (row.get("throughput_ips") or {}).get(batch)
    else:
        v = row.get(name)
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) else None


# ----------------------------------------------------------------------------- the space

def overrides(params: dict[str, Any]) -> list[str]:
    """`--set` strings for one trial's choices; a mapping choice expands to one per key."""
    out = []
    for key, value in params.items():
        items = value.items() if isinstance(value, dict) else [(None, value)]
        for sub, v in items:
            path = key if sub is None else f"{key}.{sub}"
            out.append(f"{path}={json.dumps(v)}")
    return out


def grid(space: dict[str, list]) -> list[dict]:
    keys = list(space)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(space[k] for k in keys))]


def _random_points(space: dict[str, list], n: int, seed: int) -> list[dict]:
    import random

    rng = random.Random(seed)
    points, seen = [], set()
    total = math.prod(len(v) for v in space.values())
    while len(points) < min(n, total):
        p = {k: rng.choice(v) for k, v in space.items()}
        sig = json.dumps(p, sort_keys=True)
        if sig not in seen:
            seen.add(sig)
            points.append(p)
    return points


def changed_stages(cfg, keys) -> set[str]:
    """The stages a space can change: those its keys name, and every stage downstream of them (through
    `from:` and `teacher:`); every stage when a key is outside `stages` (data, export...)."""
    names = set(cfg.stages)
    changed = {k.split(".")[1] for k in keys if k.startswith("stages.") and k.count(".") >= 1}
    if any(not k.startswith("stages.") for k in keys):
        return names
    grew = True
    while grew:
        grew = False
        for name in names - changed:
            if changed & set(cfg.inputs(name) + cfg.extra_inputs(name)):
                changed.add(name)
                grew = True
    return changed


def _sig(params: dict) -> str:
    return json.dumps(params, sort_keys=True, default=str)


# ----------------------------------------------------------------------------- loading

def load(path: str | Path) -> tuple[SweepConfig, Path, Any]:
    """(sweep config, pipeline path, validated PipelineConfig); every bad input is a SweepError here."""
    from compress import config as pconfig
    from compress.io import MAX_YAML_BYTES, FileReadError, YAMLInputError, load_yaml, read_regular_file

    path = Path(path)
    try:
        data, _ = load_yaml(read_regular_file(path, MAX_YAML_BYTES, "sweep file").decode("utf-8"))
    except FileNotFoundError:
        raise SweepError(f"{path}: no such sweep file") from None
    except UnicodeDecodeError:
        raise SweepError(f"{path}: the sweep file is not UTF-8 text") from None
    except FileReadError as exc:
        raise SweepError(str(exc)) from None
    except YAMLInputError as exc:
        raise SweepError(f"{path}{':' + str(exc.line) if exc.line else ''}: {exc}") from None
    if not isinstance(data, dict):
        raise SweepError(f"{path}: expected a mapping with 'pipeline' and 'space'")
    try:
        sweep = SweepConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<top>"
        msg = err["msg"].replace("Value error, ", "")
        if err["type"] == "extra_forbidden":
            import difflib
            close = difflib.get_close_matches(str(err["loc"][-1]), list(SweepConfig.model_fields), n=1)
            msg = f"unknown key{'; did you mean ' + repr(close[0]) + '?' if close else ''}"
        raise SweepError(f"{path}: {loc}: {msg}") from None
    pipeline = Path(os.path.normpath(path.parent / sweep.pipeline)) if not sweep.pipeline.is_absolute() else sweep.pipeline
    try:
        cfg = pconfig.load(pipeline)
        # Every choice must make a valid pipeline on its own: an unknown key names the closest one, here,
        # not in trial 7 after an hour.
        for key, choices in sweep.space.items():
            for choice in choices:
                pconfig.load(pipeline, overrides({key: choice}))
    except pconfig.ConfigError as exc:
        raise SweepError(f"{path}: space: {exc}") from None
    if sweep.sampler == "tpe":
        try:
            import optuna  # noqa: F401
        except ImportError:
            raise SweepError(f"{path}: sampler: tpe needs optuna, which is not installed "
                             f"(pip install -e '.[sweep]' from the checkout)") from None
    batches = list(cfg.benchmark.batch_sizes)
    for text_ in sweep.objectives:
        parse_objective(text_, batches)
    return sweep, pipeline, cfg


# ----------------------------------------------------------------------------- running

@dataclass
class Trial:
    index: int
    params: dict
    status: str = "pending"           # ok | failed
    wall_s: float = 0.0
    rows: list[dict] = field(default_factory=list)
    error: str | None = None

    def record(self) -> dict:
        return {"index": self.index, "params": self.params, "status": self.status, "wall_s": round(self.wall_s, 1),
                "error": self.error, "rows": self.rows}


def _compact(row: dict) -> dict:
    keep = ("name", "stage", "model", "runtime", "precision", "status", "accuracy", "latency_ms",
            "throughput_ips", "size_bytes", "params", "macs")
    return {k: row.get(k) for k in keep}


def run_trial_subprocess(pipeline: Path, sets: list[str], run_root: Path, report_root: Path, log: Path) -> list[dict]:
    """One `compress run` in a child process; its report's rows, or RuntimeError with the last log line."""
    cmd = [sys.executable, "-m", "compress", "run", str(pipeline), "--out", str(run_root),
           "--reports", str(report_root), "--no-progress"]
    for s in sets:
        cmd += ["--set", s]
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as fh:
        rc = subprocess.call(cmd, stdout=fh, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    reports = sorted(report_root.glob("*/report.json"))
    if rc != 0 or not reports:
        tail = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        raise RuntimeError(f"compress run exited {rc}: {tail[0][:300]}")
    report = json.loads(reports[0].read_text())
    stages = {n: st.get("wall_seconds") for n, st in (report.get("stages") or {}).items() if isinstance(st, dict)}
    # each artifact row carries its stage's wall time: the cost side of a recipe (0 when reused from cache),
    # and the sha256 of the file it timed: the same file in several trials is one artifact, measured again
    from compress.io import sha256_file

    rows = []
    for r in report.get("artifacts", []):
        file = Path(r["file"]) if r.get("file") else None
        sha = sha256_file(file) if file is not None and file.is_file() else None
        rows.append({**_compact(r), "stage_seconds": stages.get(r.get("name")), "sha256": sha})
    return rows


def pool_measurements(trials: list[Trial]) -> tuple[list[Trial], dict]:
    """The same file timed in several trials (a stage reused by them) is one artifact: give every copy
    the median of its p50s, per batch, so that no trial wins on a lucky draw of the clock.

    Returns the trials with pooled rows (`latency_runs`: how many measurements each p50 pools) and,
    per batch, the largest max/min ratio between measurements of one file: the machine's noise.
    """
    def ident(r: dict) -> tuple:
        return r.get("sha256"), r.get("runtime"), r.get("precision")

    p50s: dict[tuple, list[float]] = {}   # (file, runtime, precision, batch) -> the p50 of each measurement
    for t in trials:
        for r in t.rows:
            if r.get("sha256"):
                for b, v in (r.get("latency_ms") or {}).items():
                    if isinstance(v, dict) and v.get("p50") is not None:
                        p50s.setdefault((*ident(r), b), []).append(v["p50"])
    shared = {k: v for k, v in p50s.items() if len(v) > 1}
    spread: dict[str, float] = {}
    for (*_, b), v in shared.items():
        spread[b] = max(spread.get(b, 1.0), max(v) / min(v))

    def pool(r: dict) -> dict:
        mine = {b: shared[(*ident(r), b)] for b in (r.get("latency_ms") or {}) if (*ident(r), b) in shared}
        if not r.get("sha256") or not mine:
            return r
        lat = {b: {**v, "p50": round(statistics.median(mine[b]), 4)} if b in mine else v
               for b, v in r["latency_ms"].items()}
        return {**r, "latency_ms": lat, "latency_runs": {b: len(v) for b, v in mine.items()}}

    out = [Trial(t.index, t.params, t.status, t.wall_s, [pool(r) for r in t.rows], t.error) for t in trials]
    return out, {b: round(v, 2) for b, v in spread.items()}


class Sweep:
    """Plans trials, runs the ones not in the ledger, and appends each finished one to it."""

    def __init__(self, sweep: SweepConfig, pipeline: Path, cfg, out: Path, *, runner=run_trial_subprocess,
                 echo=print):
        self.sweep, self.pipeline, self.cfg, self.out = sweep, pipeline, cfg, out
        self.runner, self.echo = runner, echo
        self.objectives = [parse_objective(t, list(cfg.benchmark.batch_sizes)) for t in sweep.objectives]
        # objectives judge what the space changes: the teacher that every trial shares is no trial's result
        self.scope = changed_stages(cfg, sweep.space)
        self.done: dict[str, Trial] = {}
        ledger = out / LEDGER
        if ledger.is_file():
            for line in ledger.read_text().splitlines():
                try:
                    rec = json.loads(line)
                    t = Trial(rec["index"], rec["params"], rec["status"], rec["wall_s"], rec["rows"], rec.get("error"))
                except (ValueError, KeyError, TypeError):
                    continue   # a line cut by a kill mid-write: that trial runs again
                self.done[_sig(t.params)] = t

    # -- planning
    def plan(self) -> list[dict]:
        s = self.sweep
        if s.sampler == "grid":
            return grid(s.space)[: s.trials]
        if s.sampler == "random":
            return _random_points(s.space, s.trials, s.seed)
        return []   # tpe asks one at a time

    def _score(self, trial: Trial) -> float | None:
        best = self.objectives[0].best(in_scope(trial.rows, self.scope))
        return None if best is None else self.objectives[0].value(best)

    # -- running
    def _run_one(self, index: int, params: dict, slot: int) -> Trial:
        trial = Trial(index, params)
        tdir = self.out / "trials" / f"{index:04d}"
        run_root = self.out / "runs" / f"slot-{slot}"
        start = time.perf_counter()
        try:
            shutil.rmtree(tdir / "reports", ignore_errors=True)
            trial.rows = self.runner(self.pipeline, overrides(params), run_root, tdir / "reports", tdir / "run.log")
            trial.status = "ok"
        except Exception as exc:  # noqa: BLE001  a failed trial is a result, not the end of the sweep
            trial.status, trial.error = "failed", " ".join(str(exc).split())[:300]
        trial.wall_s = time.perf_counter() - start
        return trial

    def _finish(self, trial: Trial) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        # One write of one whole line, then fsync: a kill leaves at most a cut last line, skipped on resume.
        with open(self.out / LEDGER, "a") as fh:
            fh.write(json.dumps(trial.record(), default=str) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        self.done[_sig(trial.params)] = trial
        score = self._score(trial)
        self.echo(f"trial {trial.index}: {trial.status} in {trial.wall_s:.0f} s  {_fmt_params(trial.params)}"
                  + (f"  {self.objectives[0].column}={score:.4g}" if score is not None else "")
                  + (f"  ({trial.error})" if trial.error else ""))

    def _seed_slots(self) -> None:
        first = self.out / "runs" / "slot-0"
        for j in range(1, self.sweep.jobs):
            slot = self.out / "runs" / f"slot-{j}"
            if first.is_dir() and not slot.exists():
                shutil.copytree(first, slot, ignore=shutil.ignore_patterns(".lock", "checkpoint-*"))

    def run(self) -> list[Trial]:
        s, start, before = self.sweep, time.monotonic(), len(self.done)
        # The budget is checked before each trial but the first of this invocation: a sweep always makes progress.
        over_budget = lambda: (s.time_budget_s is not None and len(self.done) > before  # noqa: E731
                               and time.monotonic() - start > s.time_budget_s)
        if s.sampler == "tpe":
            self._run_tpe(over_budget)
        else:
            todo = [(i, p) for i, p in enumerate(self.plan()) if _sig(p) not in self.done]
            if todo and self.done:
                self.echo(f"resuming: {len(self.done)} trial(s) already done, {len(todo)} to go")
            if s.jobs == 1 or not todo:
                for i, p in todo:
                    if over_budget():
                        self.echo(f"time budget of {s.time_budget_s:g} s spent; {len(todo)} trial(s) not started")
                        break
                    self._finish(self._run_one(i, p, 0))
            else:
                if not (self.out / "runs" / "slot-0").is_dir():   # one trial first: it trains what all share
                    i, p = todo.pop(0)
                    self._finish(self._run_one(i, p, 0))
                self._seed_slots()
                with ThreadPoolExecutor(s.jobs) as pool:
                    slots = list(range(s.jobs))
                    pending = {}
                    for i, p in todo:
                        if over_budget():
                            break
                        if not slots:
                            fut = next(iter(pending))
                            self._finish(fut.result())
                            slots.append(pending.pop(fut))
                        slot = slots.pop(0)
                        pending[pool.submit(self._run_one, i, p, slot)] = slot
                    for fut in list(pending):
                        self._finish(fut.result())
        return sorted(self.done.values(), key=lambda t: t.index)

    def _run_tpe(self, over_budget) -> None:
        import optuna
        from optuna.distributions import CategoricalDistribution

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        obj = self.objectives[0]
        study = optuna.create_study(direction="maximize" if obj.sense == "max" else "minimize",
                                    sampler=optuna.samplers.TPESampler(seed=self.sweep.seed))
        # Optuna's choices must be plain values: index the choices, map back to them.
        dists = {k: CategoricalDistribution(list(range(len(v)))) for k, v in self.sweep.space.items()}
        index_of = {k: {_sig(c): i for i, c in enumerate(v)} for k, v in self.sweep.space.items()}
        for t in self.done.values():
            score = self._score(t)
            params = {k: index_of[k].get(_sig(t.params.get(k)), 0) for k in dists}
            state = optuna.trial.TrialState.COMPLETE if score is not None else optuna.trial.TrialState.FAIL
            study.add_trial(optuna.trial.create_trial(params=params, distributions=dists,
                                                      value=score if score is not None else None, state=state))
        total = math.prod(len(v) for v in self.sweep.space.values())
        index = max((t.index for t in self.done.values()), default=-1) + 1
        while len(self.done) < min(self.sweep.trials, total) and not over_budget():
            ot = study.ask(dists)
            params = {k: self.sweep.space[k][ot.params[k]] for k in dists}
            if _sig(params) in self.done:   # TPE proposed a point already measured: tell it the same answer
                score = self._score(self.done[_sig(params)])
                study.tell(ot, score, state=None if score is not None else optuna.trial.TrialState.FAIL)
                if len(study.trials) > 20 * total:
                    break
                continue
            trial = self._run_one(index, params, 0)
            index += 1
            self._finish(trial)
            score = self._score(trial)
            study.tell(ot, score, state=None if score is not None else optuna.trial.TrialState.FAIL)


def in_scope(rows: list[dict], scope: set[str] | None) -> list[dict]:
    return rows if scope is None else [r for r in rows if r.get("name") in scope]


def _fmt_params(params: dict) -> str:
    return ", ".join(f"{k.split('.')[-1]}={json.dumps(v)}" for k, v in params.items())


# ----------------------------------------------------------------------------- the combined report

def combined_report(trials: list[Trial], objectives: list[Objective], sweep: SweepConfig, pipeline: Path,
                    out: Path, batch: int, scope: set[str] | None = None) -> dict:
    """sweep.json, sweep.md and pareto.png in `out`; returns the JSON.

    `scope`: the artifacts the space changes (`changed_stages`); objectives are judged on them only.
    """
    from compress.io import atomic_write_bytes, atomic_write_json, atomic_write_text
    from compress.reporting import pareto_front

    trials, spread = pool_measurements(trials)
    points, seen = [], set()   # (trial index, row) for every scored artifact, once per file across trials
    for t in trials:
        for r in in_scope(t.rows, scope):   # the artifacts the trials differ in
            ident = (r.get("sha256"), r.get("runtime"), r.get("precision"))
            if ident[0] is not None and ident in seen:
                continue
            seen.add(ident)
            if column_value(r, "accuracy") is not None and column_value(r, f"latency_p50@{batch}") is not None:
                points.append((t.index, r))
    front = pareto_front([(column_value(r, f"latency_p50@{batch}"), column_value(r, "accuracy")) for _, r in points])
    best = []
    for obj in objectives:
        cands = [(t, obj.best(in_scope(t.rows, scope))) for t in trials if t.status == "ok"]
        cands = [(t, r) for t, r in cands if r is not None]
        if cands:
            t, r = (max if obj.sense == "max" else min)(cands, key=lambda c: obj.value(c[1]))
            best.append({"objective": obj.text, "trial": t.index, "params": t.params, "artifact": r["name"],
                         "runtime": r["runtime"], "precision": r["precision"], "value": obj.value(r)})
        else:
            best.append({"objective": obj.text, "trial": None, "message": "no trial meets it"})
    from compress.pipeline import versions

    result = {"schema": 1, "pipeline": str(pipeline), "sampler": sweep.sampler, "space": sweep.space,
              "scope": sorted(scope) if scope is not None else None,
              "trials": [t.record() for t in trials], "best": best, "pareto_batch": batch,
              "latency_spread": spread,
              "pareto": [{"trial": points[i][0], "artifact": points[i][1]["name"], "runtime": points[i][1]["runtime"],
                          "precision": points[i][1]["precision"], "accuracy": points[i][1]["accuracy"],
                          f"latency_p50@{batch}": column_value(points[i][1], f"latency_p50@{batch}")}
                         for i in front],
              "machine": _machine(), "versions": versions()}
    atomic_write_json(out / "sweep.json", result)
    atomic_write_text(out / "sweep.md", render_markdown(result, batch))
    png = _plot(points, front, batch, f"{Path(pipeline).stem}: {len(trials)} trials")
    if png:
        atomic_write_bytes(out / "pareto.png", png)
    return result


def _machine() -> dict:
    import platform
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "cores": os.cpu_count()}


def render_markdown(result: dict, batch: int) -> str:
    keys = list(result["space"])
    lines = [f"# Sweep of {result['pipeline']}", "",
             f"{len(result['trials'])} trials, sampler {result['sampler']}, on {result['machine']['cpu']} "
             f"({result['machine']['cores']} cores). Each trial's best-accuracy artifact per runtime and precision is "
             f"in sweep.json; the table shows each trial's artifacts changed by the space.", "", "## Best per objective", ""]
    for b in result["best"]:
        if b.get("trial") is None:
            lines.append(f"- `{b['objective']}`: no trial meets it")
        else:
            lines.append(f"- `{b['objective']}`: trial {b['trial']} ({_fmt_params(b['params'])}): {b['artifact']} "
                         f"on {b['runtime']} {b['precision']}, {b['value']:.4g}")
    spread = (result.get("latency_spread") or {}).get(str(batch))
    if spread:
        lines += ["", f"A file that several trials share (a reused stage) is timed again in each of them; its p50s at "
                      f"batch {batch} differed by up to {spread:.2f}x between trials on this machine. Every copy gets "
                      f"the median of its measurements, and it is one point on the plot, so latency differences "
                      f"smaller than that spread between artifacts measured once are noise."]
    lines += ["", f"## Pareto front (accuracy vs p50 latency at batch {batch}, across trials)", "",
              "| trial | artifact | runtime | precision | top-1 % | p50 ms |", "|---:|---|---|---|---:|---:|"]
    for p in sorted(result["pareto"], key=lambda p: p[f"latency_p50@{batch}"]):
        lines.append(f"| {p['trial']} | {p['artifact']} | {p['runtime']} | {p['precision']} | {p['accuracy']:.2f} | "
                     f"{p[f'latency_p50@{batch}']:.3f} |")
    lines += ["", "## Trials", "", "| trial | " + " | ".join(k.split('.', 1)[-1] for k in keys)
              + " | status | trial s | artifact | stage s | runtime | precision | top-1 % | p50 ms |",
              "|---:|" + "---|" * len(keys) + "---|---:|---|---:|---|---|---:|---:|"]
    touched = set(result["scope"] or {r["name"] for t in result["trials"] for r in t["rows"]})
    for t in result["trials"]:
        settings = " | ".join(json.dumps(t["params"].get(k)) for k in keys)
        rows = [r for r in t["rows"] if r["name"] in touched and column_value(r, "accuracy") is not None
                and column_value(r, f"latency_p50@{batch}") is not None] or [None]
        for r in rows:
            stage_s = r.get("stage_seconds") if r is not None else None
            tail = ("| | | | | |" if r is None else
                    f"| {r['name']} | {'-' if stage_s is None else f'{stage_s:.0f}'} | {r['runtime']} | "
                    f"{r['precision']} | {r['accuracy']:.2f} | "
                    f"{column_value(r, f'latency_p50@{batch}'):.3f}{_runs(r, batch)} |")
            lines.append(f"| {t['index']} | {settings} | {t['status']} | {t['wall_s']:.0f} {tail}")
    return "\n".join(lines) + "\n"


def _runs(row: dict, batch: int) -> str:
    n = (row.get("latency_runs") or {}).get(str(batch))
    return f" (median of {n})" if n else ""


def _plot(points: list[tuple[int, dict]], front: list[int], batch: int, title: str) -> bytes | None:
    if not points:
        return None
    import io

    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [column_value(r, f"latency_p50@{batch}") for _, r in points]
    ys = [column_value(r, "accuracy") for _, r in points]
    ax.scatter(xs, ys, s=14, alpha=0.5, color="tab:gray", label="trial artifacts")
    fx = [xs[i] for i in sorted(front, key=lambda i: xs[i])]
    fy = [ys[i] for i in sorted(front, key=lambda i: xs[i])]
    ax.plot(fx, fy, "-o", color="tab:red", label="Pareto front")
    for i in front:
        ax.annotate(f"t{points[i][0]} {points[i][1]['name']}", (xs[i], ys[i]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel(f"p50 latency at batch {batch} (ms, log)")
    ax.set_ylabel("test top-1 (%)")
    ax.set_title(title)
    ax.legend(loc="lower right")
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()
