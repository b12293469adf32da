"""`compress compare`: line up two or more reports and gate a change on the difference.

Artifacts are matched by (name, runtime, precision); accuracy and p50 latency at every batch
size the reports share are shown next to their deltas against the first report, the baseline.
Gates turn the comparison into a CI check (`--fail-if "accuracy_drop>0.5"`):

    accuracy_drop       baseline top-1 minus the other report's, in points (worst artifact)
    latency_increase    the other report's p50 minus the baseline's, in ms, or relative with a
                        trailing % (worst artifact and batch size)

Reports measured on different machines can be compared, but latency deltas between them say
more about the machines than about the models, so the comparison says so.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

REPORT_SCHEMA_PREFIX = "compress.report/"
METRICS = {"accuracy_drop": "points", "latency_increase": "ms or %"}
_GATE = re.compile(r"^\s*([a-z_]+)\s*(>=|>)\s*([0-9]*\.?[0-9]+)\s*(%?)\s*$")

Key = tuple[str, str, str]  # (artifact name, runtime, precision)


class CompareError(ValueError):
    """A report that cannot be read or a gate that cannot be parsed; one line for the user."""


# ----------------------------------------------------------------------------- inputs

MAX_REPORT_BYTES = 64 << 20  # a report of hundreds of artifacts is well under 1 MB


class _Open(BaseModel):
    model_config = ConfigDict(extra="allow", allow_inf_nan=False, strict=True)


class _Latency(_Open):
    p50: Optional[float] = None


class _Row(_Open):
    """The fields of a report row that compare and deploy read, with the types they need."""
    name: str
    runtime: str
    precision: str
    status: str = "ok"
    accuracy: Optional[float] = None
    latency_ms: Optional[dict[str, Optional[_Latency]]] = None
    reason: Optional[str] = None

    @field_validator("latency_ms")
    @classmethod
    def _batches(cls, value):
        for batch in value or {}:
            if not batch.isdigit() or len(batch) > 9:
                raise ValueError(f"batch size key {batch[:20]!r} is not a number")
        return value


class _Pipeline(_Open):
    name: str
    config: dict = {}


class _Machine(_Open):
    model_config = ConfigDict(extra="allow", strict=False)  # cpu/gpu are shown as text, whatever they are


class ReportSchema(_Open):
    schema_: str = Field(alias="schema", pattern=r"^compress\.report/")
    pipeline: _Pipeline
    artifacts: list[_Row]
    machine: Optional[_Machine] = None
    created: Optional[str] = None
    run_dir: Optional[str] = None
    data: Optional[dict] = None


def check_report(report: Any, file: str | Path) -> dict:
    """`report` (parsed JSON) checked against the fields compress reads; CompareError naming the first bad one."""
    try:
        ReportSchema.model_validate(report)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(x) for x in err["loc"]) or "<top>"
        if loc == "schema" or not isinstance(report, dict):
            raise CompareError(f"{file}: not a compress report (no schema {REPORT_SCHEMA_PREFIX}* with "
                               f"artifacts)") from None
        msg = err["msg"].replace("Input should be", "expected")
        raise CompareError(f"{file}: not a report this version can read: {loc}: {msg}") from None
    return report


def load_report(path: str | Path) -> dict:
    """A report.json, given as the file or the report directory holding it."""
    from compress.io import FileReadError, read_regular_file

    path = Path(path)
    file = path / "report.json" if path.is_dir() else path
    try:
        report = json.loads(read_regular_file(file, MAX_REPORT_BYTES, "report.json"))
    except FileNotFoundError:
        raise CompareError(f"{file}: no such file" + (" (expected a report.json or a report directory)"
                                                      if not path.is_dir() else "")) from None
    except FileReadError as exc:
        raise CompareError(str(exc)) from None
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise CompareError(f"{file}: not a readable report.json ({type(exc).__name__}: "
                           f"{str(exc).splitlines()[0][:120] if str(exc) else ''})") from None
    check_report(report, file)
    report["_path"] = str(file)
    return report


@dataclass(frozen=True)
class Gate:
    text: str        # as the user wrote it
    metric: str      # accuracy_drop | latency_increase
    inclusive: bool  # >= rather than >
    threshold: float
    relative: bool   # latency_increase given in %


def parse_gate(text: str) -> Gate:
    """`accuracy_drop>0.5`, `latency_increase>10%`, `latency_increase>=0.2` (ms)."""
    m = _GATE.match(text)
    if not m:
        raise CompareError(f"--fail-if {text!r}: expected METRIC>VALUE such as 'accuracy_drop>0.5' or "
                           f"'latency_increase>10%' (metrics: {', '.join(METRICS)})")
    metric, op, value, pct = m.groups()
    if metric not in METRICS:
        raise CompareError(f"--fail-if {text!r}: unknown metric {metric!r} (metrics: {', '.join(METRICS)})")
    if pct and metric == "accuracy_drop":
        raise CompareError(f"--fail-if {text!r}: accuracy_drop is already in percentage points; "
                           f"write accuracy_drop>{value}")
    return Gate(text.strip(), metric, op == ">=", float(value), bool(pct))


# ----------------------------------------------------------------------------- matching

def _ok(row: dict) -> bool:
    return row.get("status") == "ok" and row.get("accuracy") is not None and bool(row.get("latency_ms"))


def _p50(row: dict | None, batch: str) -> float | None:
    if row is None or not _ok(row):
        return None
    lat = row["latency_ms"].get(batch)
    return None if lat is None else lat.get("p50")


@dataclass
class Comparison:
    reports: list[dict]
    labels: list[str]                       # A, B, C...
    batches: list[str]                      # batch sizes measured in every report
    keys: list[Key]                         # artifacts present in every report, baseline order
    rows: dict[Key, list[dict]]             # key -> the row in each report
    only: dict[str, list[Key]] = field(default_factory=dict)   # label -> keys found only in some reports
    machine_note: str | None = None
    warnings: list[str] = field(default_factory=list)          # pipelines, datasets or models that differ
    mismatched: set[Key] = field(default_factory=set)          # rows whose model or dataset differ from A's
    include_mismatched: bool = False                           # show and gate their deltas anyway

    def _deltas_for(self, key: Key) -> bool:
        return self.include_mismatched or key not in self.mismatched

    def accuracy_deltas(self) -> list[tuple[float, Key, int]]:
        """(baseline accuracy - other accuracy, key, report index) for every pair with both numbers."""
        out = []
        for key in filter(self._deltas_for, self.keys):
            base = self.rows[key][0]
            for i, other in enumerate(self.rows[key][1:], start=1):
                if _ok(base) and _ok(other):
                    out.append((base["accuracy"] - other["accuracy"], key, i))
        return out

    def latency_deltas(self) -> list[tuple[float, float, Key, int, str]]:
        """(increase in ms, relative increase, key, report index, batch) for every pair with both numbers."""
        out = []
        for key in filter(self._deltas_for, self.keys):
            for b in self.batches:
                base = _p50(self.rows[key][0], b)
                for i, other in enumerate(self.rows[key][1:], start=1):
                    p = _p50(other, b)
                    if base is not None and p is not None and base > 0:
                        out.append((p - base, (p - base) / base, key, i, b))
        return out


def _machine(report: dict) -> tuple[str, str]:
    m = report.get("machine") or {}
    return str(m.get("cpu") or "?"), str(m.get("gpu") or "no GPU")


def _dataset(report: dict) -> tuple:
    d = report.get("data") or {}
    return (d.get("name"), d.get("fingerprint"), d.get("num_test"))


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        return {k: v for key, sub in value.items() for k, v in _flat(sub, f"{prefix}{key}.").items()}
    return {prefix[:-1]: value}


def _differences(reports: list[dict], labels: list[str], keys: list[Key],
                 rows: dict[Key, list[dict]]) -> tuple[list[str], set[Key]]:
    """What differs between the reports beyond the runs themselves: warnings, and the rows whose
    deltas would compare different models or different data (a resnet8 on synthetic images
    and a resnet20 on Fashion-MNIST can both be called `teacher`)."""
    warnings, mismatched = [], set()
    names = [(rep.get("pipeline") or {}).get("name", "?") for rep in reports]
    if len(set(names)) > 1:
        warnings.append("pipelines differ: " + ", ".join(f"{lab} {n}" for lab, n in zip(labels, names)))
    else:
        configs = [_flat((rep.get("pipeline") or {}).get("config") or {}) for rep in reports]
        # keys in both only: a key one version of compress added (with its default) is no difference
        changed = sorted({k for c in configs[1:] for k in set(c) & set(configs[0]) if c[k] != configs[0][k]})
        if changed:
            more = f" and {len(changed) - 5} more" if len(changed) > 5 else ""
            warnings.append(f"pipeline {names[0]}: the configs differ in {', '.join(changed[:5])}{more}")
    data = [_dataset(rep) for rep in reports]
    other_data = [lab for lab, d in zip(labels[1:], data[1:]) if d != data[0]]
    if other_data:
        warnings.append("datasets differ: " + ", ".join(
            f"{lab} {d[0] or '?'} ({(d[1] or '?')[:12]}, {d[2] or '?'} test images)" for lab, d in zip(labels, data)))
        mismatched.update(keys)
    for key in keys:
        models = [r.get("model") for r in rows[key]]
        if any(m != models[0] for m in models[1:]):
            mismatched.add(key)
            warnings.append(f"{key[0]} ({key[1]}, {key[2]}): models differ: "
                            + ", ".join(f"{lab} {m or '?'}" for lab, m in zip(labels, models)))
    if mismatched:
        warnings.append(f"{len(mismatched)} row(s) compare different models or data: their deltas are not "
                        "shown and no gate reads them (--include-mismatched to show and gate them)")
    return warnings, mismatched


def compare(reports: list[dict], labels: list[str] | None = None, include_mismatched: bool = False) -> Comparison:
    """Match the reports' rows by (name, runtime, precision); the first report is the baseline."""
    if len(reports) < 2:
        raise CompareError("compare needs at least two reports")
    labels = labels or [chr(ord("A") + i) if i < 26 else f"R{i}" for i in range(len(reports))]
    indexed = [{(r["name"], r["runtime"], r["precision"]): r for r in rep["artifacts"]} for rep in reports]
    keys = [k for k in indexed[0] if all(k in idx for idx in indexed[1:])]
    common = set(keys)
    only = {lab: [k for k in idx if k not in common] for lab, idx in zip(labels, indexed)}
    measured = [{b for r in rep["artifacts"] if _ok(r) for b in r["latency_ms"]} for rep in reports]
    batches = sorted(set.intersection(*measured), key=int)
    machines = [_machine(rep) for rep in reports]
    note = None
    if len(set(machines)) > 1:
        note = ("the reports come from different machines, so latency deltas compare machines as much as models: "
                + "; ".join(f"{lab}: {cpu}, {gpu}" for lab, (cpu, gpu) in zip(labels, machines)))
    rows = {k: [idx[k] for idx in indexed] for k in keys}
    warnings, mismatched = _differences(reports, labels, keys, rows)
    return Comparison(reports, labels, batches, keys, rows, {lab: ks for lab, ks in only.items() if ks}, note,
                      warnings, mismatched, include_mismatched)


def check_gates(cmp: Comparison, gates: list[Gate]) -> list[str]:
    """One line per violated gate, naming the worst artifact; [] when every gate holds.

    A gate with nothing to measure (no artifact measured in both reports) is violated: a CI
    check that silently passes because the names changed would hide exactly what it guards.
    """
    failures = []
    for gate in gates:
        if gate.metric == "accuracy_drop":
            deltas = cmp.accuracy_deltas()
            if not deltas:
                failures.append(f"{gate.text}: no artifact has an accuracy in both reports to compare")
                continue
            drop, key, i = max(deltas, key=lambda d: d[0])
            value, shown = drop, f"{drop:.2f} points"
        else:
            deltas = cmp.latency_deltas()
            if not deltas:
                failures.append(f"{gate.text}: no artifact has a p50 latency at a common batch size in both reports")
                continue
            ms, rel, key, i, b = max(deltas, key=lambda d: d[1] if gate.relative else d[0])
            value = rel * 100 if gate.relative else ms
            shown = f"{rel * 100:+.1f}% ({ms:+.3f} ms) at batch {b}"
        value = round(value, 6)  # 90.0 - 89.2 is 0.79999999999999716: read it as the 0.8 it means
        if value > gate.threshold or (gate.inclusive and value == gate.threshold):
            name, runtime, precision = key
            failures.append(f"{gate.text} violated: {name} ({runtime}, {precision}) in {cmp.labels[i]} vs "
                            f"{cmp.labels[0]}: {shown}")
    return failures


# ----------------------------------------------------------------------------- output

def _delta_style(delta: float, good_if_positive: bool) -> str:
    if abs(delta) < 1e-12:
        return "dim"
    return "green" if (delta > 0) == good_if_positive else "red"


def table(cmp: Comparison):
    """A rich Table: accuracy and p50 per report, with deltas against the first."""
    from rich.table import Table

    t = Table(title="compare (deltas vs " + cmp.labels[0] + ")", show_lines=False)
    for col in ("artifact", "runtime", "precision"):
        t.add_column(col)
    for lab in cmp.labels:
        t.add_column(f"top-1 % {lab}", justify="right")
    for b in cmp.batches:
        for lab in cmp.labels:
            t.add_column(f"p50 ms @{b} {lab}", justify="right")
    for key in cmp.keys:
        rows = cmp.rows[key]
        cells = list(key)
        if key in cmp.mismatched:
            cells[0] += " [yellow](differs)[/]"
        deltas = cmp._deltas_for(key)
        base = rows[0]
        for i, r in enumerate(rows):
            if not _ok(r):
                cells.append(f"[dim]{r.get('status')}[/]")
            elif i == 0 or not _ok(base) or not deltas:
                cells.append(f"{r['accuracy']:.2f}")
            else:
                d = r["accuracy"] - base["accuracy"]
                cells.append(f"{r['accuracy']:.2f} [{_delta_style(d, True)}]({d:+.2f})[/]")
        for b in cmp.batches:
            p0 = _p50(base, b)
            for i, r in enumerate(rows):
                p = _p50(r, b)
                if p is None:
                    cells.append("[dim]-[/]")
                elif i == 0 or p0 is None or not deltas:
                    cells.append(f"{p:.3f}")
                else:
                    rel = (p - p0) / p0 * 100 if p0 > 0 else 0.0
                    cells.append(f"{p:.3f} [{_delta_style(rel, False)}]({rel:+.1f}%)[/]")
        t.add_row(*cells)
    return t


def legend(cmp: Comparison) -> list[str]:
    lines = []
    for lab, rep in zip(cmp.labels, cmp.reports):
        name = (rep.get("pipeline") or {}).get("name", "?")
        lines.append(f"{lab}: {rep['_path']} ({name}, {rep.get('created', '?')}, "
                     f"{'; '.join(_machine(rep))})")
    for lab, keys in cmp.only.items():
        lines.append(f"only in {lab} (not compared): " + ", ".join(f"{n} ({rt}, {p})" for n, rt, p in keys))
    if not cmp.batches:
        lines.append("no batch size was measured in every report: latency is not compared")
    return lines


MACHINE_FIELDS = ("cpu", "cores", "torch_threads", "gpu", "cuda", "os")
MACHINE_VERSIONS = ("torch", "onnxruntime", "tensorrt")


def machine_table(cmp: Comparison):
    """The machines the reports were measured on, one column per report: latency is theirs too."""
    from rich.table import Table
    from rich.text import Text  # the values come from the files: not markup

    t = Table(title="machines")
    t.add_column("")
    for lab in cmp.labels:
        t.add_column(lab)
    machines = [rep.get("machine") or {} for rep in cmp.reports]
    for name in MACHINE_FIELDS:
        t.add_row(name, *[Text(str(m.get(name) if m.get(name) is not None else "-")) for m in machines])
    for name in MACHINE_VERSIONS:
        versions = [m.get("versions") if isinstance(m.get("versions"), dict) else {} for m in machines]
        t.add_row(name, *[Text(str(v.get(name) or "-")) for v in versions])
    return t


def _text(label: str, limit: int = 60) -> str:
    """A label from a report, safe for matplotlib: `$` would start mathtext (a parse error on odd input)."""
    label = " ".join(str(label).split())
    label = label if len(label) <= limit else label[:limit - 1] + "\u2026"
    return label.replace("$", r"\$")


def check_plot_path(path: str | Path) -> None:
    """CompareError unless a PNG can be written at `path`: not a directory, no file where a folder must be."""
    path = Path(path)
    if path.is_dir():
        raise CompareError(f"--plot {path}: is a directory; give a file name such as {path / 'compare.png'}")
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise CompareError(f"--plot {path}: {parent} is a file, not a directory")
    if len(path.name.encode()) > 255 or "\0" in str(path):
        raise CompareError(f"--plot {str(path)[:80]!r}: not a valid file name")


def plot(cmp: Comparison, path: str | Path) -> Path:
    """Accuracy vs p50 latency at the smallest common batch size, one colour per report, an arrow
    from each artifact's baseline point to its point in every other report."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from compress.io import atomic_write_bytes

    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=120)
    batch = cmp.batches[0] if cmp.batches else None
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    markers = {"torch": "o", "onnxruntime": "s", "tensorrt": "^"}
    for i, (lab, rep) in enumerate(zip(cmp.labels, cmp.reports)):
        color = colors[i % len(colors)]
        for r in rep["artifacts"]:
            p = _p50(r, batch) if batch else None
            if p is None:
                continue
            ax.scatter(p, r["accuracy"], marker=markers.get(r["runtime"], "o"), s=50, color=color, zorder=3)
            if i == 0:
                ax.annotate(_text(f"{r['name']} ({r['runtime']}, {r['precision']})"), (p, r["accuracy"]),
                            textcoords="offset points", xytext=(6, 4), fontsize=7)
        ax.scatter([], [], color=color, label=_text(f"{lab}: {(rep.get('pipeline') or {}).get('name', '?')}"))
    if batch:
        for key in filter(cmp._deltas_for, cmp.keys):
            base = cmp.rows[key][0]
            p0 = _p50(base, batch)
            for other in cmp.rows[key][1:]:
                p = _p50(other, batch)
                if p0 is not None and p is not None:
                    ax.annotate("", (p, other["accuracy"]), (p0, base["accuracy"]),
                                arrowprops={"arrowstyle": "->", "color": "gray", "alpha": 0.6})
    from compress.reporting import finish_plot

    xlabel = f"latency p50 at batch {batch} (ms, log scale)" if batch else "latency (no common batch size)"
    return atomic_write_bytes(path, finish_plot(fig, ax, xlabel, "compare: accuracy vs latency"))
