"""What a report says and how it looks: flags, tables, the accuracy-vs-latency plot, Markdown and HTML.

One row per artifact and runtime; the plot puts accuracy against latency at the smallest
batch size, one point per row, with the Pareto front (no other row both faster and more
accurate) marked. report.html is the same report in one self-contained file (the plot
inlined as a data URI), for attaching to an issue or a CI run.

Flags point at numbers that contradict the reason an artifact exists: an INT8 model that is
not faster than the float model it replaces, on the same runtime at the same batch size
(on a CPU, ONNX Runtime's QDQ kernels often lose to FP32 on models this small), and a pruned
model not faster than the model it was pruned from (fewer MACs are not fewer milliseconds
when a run is overhead-bound, or when odd channel counts miss the fast kernels).
"""

from __future__ import annotations

import base64
import html
import io
import math
import os

SCHEMA = "compress.report/1"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of points (latency, accuracy) that no other point beats on both (lower, higher)."""
    front = []
    for i, (lat, acc) in enumerate(points):
        dominated = any((l2 <= lat and a2 >= acc) and (l2 < lat or a2 > acc) for j, (l2, a2) in enumerate(points)
                        if j != i)
        if not dominated:
            front.append(i)
    return sorted(front, key=lambda i: points[i][0])


def _ok(rows: list[dict]) -> list[dict]:
    return [r for r in rows if r["status"] == "ok" and r.get("accuracy") is not None and r.get("latency_ms")]


def _batches(rows: list[dict]) -> list[int]:
    return sorted({int(b) for r in _ok(rows) for b in r["latency_ms"]})


def _plot_batch(rows: list[dict]) -> str | None:
    sizes = _batches(rows)
    return str(sizes[0]) if sizes else None


def int8_flags(rows: list[dict]) -> list[dict]:
    """INT8 rows not faster (p50) than the float model they replace, per batch size.

    The reference is the same runtime's FP16 row, else its FP32 row, of the artifact itself
    or, for a quantize stage, of its parent (the model it was quantized from).
    """
    ok = {(r["name"], r["runtime"], r["precision"]): r for r in _ok(rows)}
    flags = []
    for r in _ok(rows):
        if r["precision"] != "int8":
            continue
        ref = next((ok[(name, r["runtime"], p)] for p in ("fp16", "fp32") for name in (r["name"], r["parent"])
                    if (name, r["runtime"], p) in ok), None)
        if ref is not None:
            flags += _not_faster(r, ref, "int8_not_faster", lambda b, mine, theirs: (
                f"INT8 is not faster than {ref['precision'].upper()} {ref['name']} on {r['runtime']} at batch "
                f"{b}: p50 {mine:.3f} ms vs {theirs:.3f} ms ({mine / max(theirs, 1e-9):.1f}x)"))
    return flags


def _not_faster(r: dict, ref: dict, kind: str, message) -> list[dict]:
    """A flag for each batch size at which row `r` is not faster (p50) than `ref` on the same runtime."""
    out = []
    for b in sorted(set(r["latency_ms"]) & set(ref["latency_ms"]), key=int):
        mine, theirs = r["latency_ms"][b]["p50"], ref["latency_ms"][b]["p50"]
        if mine >= theirs:
            out.append({"artifact": r["name"], "runtime": r["runtime"], "batch": int(b), "kind": kind,
                        "reference": {"artifact": ref["name"], "precision": ref["precision"]},
                        "p50_ms": mine, "reference_p50_ms": theirs, "message": message(b, mine, theirs)})
    return out


def pruned_flags(rows: list[dict]) -> list[dict]:
    """Pruned rows not faster (p50) than their parent on the same runtime and precision, per batch size."""
    ok = {(r["name"], r["runtime"], r["precision"]): r for r in _ok(rows)}
    flags = []
    for r in _ok(rows):
        ref = ok.get((r.get("parent"), r["runtime"], r["precision"])) if r.get("stage") == "prune" else None
        if ref is not None:
            flags += _not_faster(r, ref, "pruned_not_faster", lambda b, mine, theirs: (
                f"pruned, but not faster than {ref['name']} ({ref['precision'].upper()}) on {r['runtime']} at "
                f"batch {b}: p50 {mine:.3f} ms vs {theirs:.3f} ms ({mine / max(theirs, 1e-9):.2f}x)"))
    return flags


def parity_flags(rows: list[dict]) -> list[dict]:
    """Rows (a TensorRT engine, an OpenVINO model...) whose top-1 decisions on the parity images
    disagree with ONNX Runtime running the ONNX they came from more than their precision allows."""
    flags = []
    for r in rows:
        p = r.get("parity") or {}
        agree, minimum = p.get("top1_agreement"), p.get("min_agreement")
        if agree is None or minimum is None or agree >= minimum:
            continue
        flags.append({
            "artifact": r["name"], "runtime": r["runtime"], "batch": None, "kind": "outputs_disagree",
            "reference": {"runtime": p.get("reference"), "precision": p.get("reference_precision")},
            "top1_agreement": agree, "max_abs_diff": p.get("max_abs_diff"),
            "message": f"{r['runtime']} {r['precision'].upper()} agrees with {p.get('reference')} "
                       f"{str(p.get('reference_precision') or r['precision']).upper()} on {agree:.1%} of "
                       f"{p.get('n')} parity images (at least {minimum:.0%} expected), max |diff| "
                       f"{p.get('max_abs_diff')}",
        })
    return flags


def summary_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """The artifacts table (header, cells), ok rows sorted by p50 latency at the smallest batch size."""
    ok, batches = _ok(rows), _batches(rows)
    first = str(batches[0]) if batches else None
    head = ["artifact", "stage", "model", "runtime", "precision", "device", "top-1 %", "params", "MACs", "size"]
    for b in batches:
        head += [f"p50 / p99 ms @{b}", f"img/s @{b}"]
    key = (lambda r: r["latency_ms"].get(first, {}).get("p50", float("inf"))) if first else (lambda r: 0)
    body = []
    for r in sorted(ok, key=key):
        # which file ran (an INT8 artifact has one per runtime) and the precision the runtime really used
        precision = r["precision"] + (f" ({r['inference_precision']})" if r.get("inference_precision") else "")
        if r.get("file") and r["runtime"] != "torch":
            precision += f", {os.path.basename(r['file'])}"
        cells = [r["name"], r["stage"], r["model"], r["runtime"], precision, r.get("device") or "",
                 f"{r['accuracy']:.2f}", _fmt_count(r["params"]), _fmt_count(r["macs"]), _fmt_bytes(r["size_bytes"])]
        for b in batches:
            lat = r["latency_ms"].get(str(b))
            cells += [f"{lat['p50']:.3f} / {lat['p99']:.3f}" if lat else "-",
                      f"{r['throughput_ips'][str(b)]:,.0f}" if lat else "-"]
        body.append(cells)
    return head, body


def parity_table(rows: list[dict]) -> tuple[list[str], list[list[str]]]:
    """Each row checked against ONNX Runtime on the parity images (TensorRT engines, OpenVINO...)."""
    head = ["artifact", "runtime", "precision", "reference", "max abs diff", "top-1 agreement", "images"]
    body = []
    for r in rows:
        p = r.get("parity") or {}
        if p.get("top1_agreement") is None:
            continue
        ref = f"{p.get('reference')} {str(p.get('reference_precision') or r['precision'])}"
        body.append([r["name"], r["runtime"], r["precision"], ref,
                     "-" if p.get("max_abs_diff") is None else f"{p['max_abs_diff']:.2e}",
                     f"{p['top1_agreement'] * 100:.1f}%", str(p.get("n", "-"))])
    return head, body


def training_facts(metrics: dict) -> dict:
    """The part of a stage's metrics that `fit` wrote (fast path, images/s, history): the metrics
    themselves for train/distill/prune, `metrics.qat` for a QAT quantize stage, {} for PTQ."""
    return metrics if "fast_path" in metrics else (metrics.get("qat") or {})


def stages_table(report: dict) -> tuple[list[str], list[list[str]]]:
    head = ["stage", "type", "from", "best val top-1 %", "ONNX max abs diff", "ONNX top-1 agreement", "wall s",
            "trained with"]
    body = []
    for name, s in report["stages"].items():
        parity = s.get("onnx_parity") or {}
        diff, agree, val = parity.get("max_abs_diff"), parity.get("top1_agreement"), s.get("best_accuracy")
        fast = training_facts(s.get("metrics") or {}).get("fast_path") or {}   # fp32, channels_last, bf16...
        body.append([name, s["type"], ", ".join(s["from"]) or "-", "-" if val is None else f"{val:.2f}",
                     "-" if diff is None else f"{diff:.2e}", "-" if agree is None else f"{agree * 100:.1f}%",
                     _stage_wall(s), fast.get("mode", "-")])
    return head, body


def _machine_details(machine: dict) -> str:
    cores = machine.get("cores", machine.get("cpu_count"))  # machine_info says "cores"; early reports "cpu_count"
    return f"({cores} cores, torch threads {machine.get('torch_threads')}), GPU: {machine.get('gpu') or 'none'}"


def _trained_over_parts(stage: dict) -> float | None:
    """A stage resumed from a checkpoint trained in several runs; its manifest's `train_seconds` spans them all
    (the checkpoint carries it), while its wall time is that of the run that finished it. The span, when it
    exceeds that wall time; None otherwise, or when the report does not say how long the stage took."""
    shown = stage.get("built_seconds") if stage.get("reused") else stage.get("wall_seconds")
    train = (stage.get("metrics") or {}).get("train_seconds")
    return float(train) if shown and train and train > shown + 1.0 else None


def _stage_wall(stage: dict) -> str:
    parts = _trained_over_parts(stage)
    if stage.get("reused") and stage.get("built_seconds"):
        more = f"; trained {parts:.1f} over all runs" if parts else ""
        return f"reused ({stage['built_seconds']:.1f} when built{more})"
    return f"{stage['wall_seconds']:.1f}" + (f" (resumed; trained {parts:.1f} over all runs)" if parts else "")


def _wall_line(report: dict) -> str:
    total = report["wall_seconds"].get("total")
    if not total:
        return ""
    reused = [s for s in report["stages"].values() if s.get("reused")]
    built = sum(s.get("built_seconds") or 0.0 for s in reused)
    note = (f" ({len(reused)} of {len(report['stages'])} stages reused from the cache; building them took "
            f"{built:.1f} s)" if reused else "")
    resumed = [s for s in report["stages"].values() if _trained_over_parts(s)]
    if resumed:
        note += (f"; {len(resumed)} resumed from a checkpoint, so earlier runs' training is not in these sums"
                 " (stage table: training over all runs)")
    return f"Benchmark: {report['wall_seconds'].get('benchmark', 0):.1f} s. Whole run: {total:.1f} s{note}."


def plot_pareto(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = _plot_batch(rows)
    ok = [r for r in _ok(rows) if batch in r["latency_ms"]]
    fig, ax = plt.subplots(figsize=(9.5, 5.5), dpi=120)
    markers = {"torch": "o", "onnxruntime": "s", "tensorrt": "^"}
    points = [(r["latency_ms"][batch]["p50"], r["accuracy"]) for r in ok]
    front = pareto_front(points)
    for i, (r, (lat, acc)) in enumerate(zip(ok, points)):
        ax.scatter(lat, acc, marker=markers.get(r["runtime"], "o"), s=60,
                   color="tab:red" if i in front else "tab:blue", zorder=3)
        ax.annotate(f"{r['name']} ({r['runtime']}, {r['precision']})", (lat, acc), textcoords="offset points",
                    xytext=(6, 4), fontsize=7)
    if front:
        ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="tab:red",
                label="Pareto front", zorder=2)
    for runtime, marker in markers.items():
        ax.scatter([], [], marker=marker, color="gray", label=runtime)
    return finish_plot(fig, ax, f"latency p50 at batch {batch} (ms, log scale)", title)


def finish_plot(fig, ax, xlabel: str, title: str) -> bytes:
    """Shared look of every accuracy-vs-latency plot (report and compare); returns the PNG bytes."""
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FormatStrFormatter, FuncFormatter

    if not any(len(c.get_offsets()) for c in ax.collections):   # nothing measured (benchmark.runtimes: [])
        ax.set_xlim(0.1, 10)
        ax.text(0.5, 0.5, "no artifact was benchmarked", ha="center", va="center", transform=ax.transAxes)
    ax.set_xscale("log")
    # Plain numbers (0.3, 2) instead of 3x10^-1 on the log axis; between decades only 2, 3 and 5
    # are labelled, so the labels never run into each other.
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(FuncFormatter(
        lambda v, _: f"{v:g}" if v > 0 and round(v / 10 ** math.floor(math.log10(v))) in (2, 3, 5) else ""))
    ax.set_xlabel(xlabel)
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)  # outside: no point hidden
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _fmt_count(n) -> str:
    if n is None:
        return "-"
    return f"{n / 1e6:.2f} M" if n >= 1e5 else f"{n / 1e3:.1f} k"


def _fmt_bytes(n) -> str:
    return "-" if n is None else (f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 2**10:.0f} KiB")


def render_markdown(report: dict) -> str:
    rows, machine = report["artifacts"], report["machine"]
    lines = [f"# compress report: {report['pipeline']['name']}", "",
             f"Created {report['created']} from `{report['pipeline']['file']}` on **{machine.get('cpu')}** "
             f"{_machine_details(machine)}.", ""]

    def table(head, body):
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)] + ["| " + " | ".join(c) + " |" for c in body]

    lines += ["## Artifacts (sorted by latency)", ""] + table(*summary_table(rows))
    lines += ["", "Latency: warm-up, then timed iterations; p50/p90/p99 over iterations "
              "(full numbers in report.json). CPU timings use the thread count shown in the device column.", ""]
    if parity_table(rows)[1]:
        lines += ["## Runtime parity (vs ONNX Runtime, parity images)", ""] + table(*parity_table(rows)) + [""]
    flags = report.get("flags") or []
    if flags:
        lines += ["## Flags", ""] + [f"- **{f['artifact']}**: {f['message']}" for f in flags] + [""]
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        lines += ["## Skipped or failed", "", "| artifact | runtime | precision | status | why |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['status']} | {r['reason']} |" for r in others]
        lines.append("")
    lines += ["## Accuracy vs latency", "", "![accuracy vs latency](pareto.png)", ""]
    lines += ["## Stages", ""] + table(*stages_table(report))
    lines += ["", _wall_line(report), ""]
    if report.get("layer_tables"):
        lines += ["## Per-layer tables", "", "Channels, MACs and sensitivity per layer of each pruned or quantized model:",
                  ""] + [f"- [{name}]({path})" for name, path in report["layer_tables"].items()] + [""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items() if k != "versions"]
    lines += [f"| {k} | {v} |" for k, v in machine.get("versions", {}).items()]
    lines += ["", "## Pipeline", "", "```yaml", report["pipeline"]["yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


_CSS = """
body { font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2em auto; max-width: 1400px;
       padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; } h2 { font-size: 1.15em; margin-top: 1.8em; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; margin: .5em 0; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; white-space: nowrap; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
th { background: #f4f4f4; } tr:nth-child(even) td { background: #fafafa; }
.flags { background: #fff4e5; border-left: 4px solid #f0a030; padding: .5em 1em; }
.note { color: #666; font-size: 12px; }
pre { background: #f6f8fa; padding: 1em; overflow-x: auto; font-size: 12px; }
img { max-width: 100%; }
"""


def render_html(report: dict, png: bytes | None = None, layer_texts: dict[str, str] | None = None) -> str:
    """The report as one self-contained HTML file: inline CSS, the plot as a data URI, no external assets.

    `layer_texts` (artifact name -> its per-layer Markdown table) are inlined as collapsed sections.
    """
    esc = html.escape
    rows, machine = report["artifacts"], report["machine"]

    def table(head, body, numeric_from: int = 0):
        out = ["<table><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr>"]
        for cells in body:
            out.append("<tr>" + "".join(f"<td{' class=num' if numeric_from and i >= numeric_from else ''}>"
                                        f"{esc(str(c))}</td>" for i, c in enumerate(cells)) + "</tr>")
        return "\n".join(out + ["</table>"])

    name = esc(report["pipeline"]["name"])
    parts = [f"<!DOCTYPE html>\n<html lang=en><head><meta charset=utf-8><title>compress report: {name}</title>",
             f"<style>{_CSS}</style></head><body>",
             f"<h1>compress report: {name}</h1>",
             f"<p>Created {esc(report['created'])} from <code>{esc(report['pipeline']['file'])}</code> on "
             f"<b>{esc(str(machine.get('cpu')))}</b> {esc(_machine_details(machine))}.</p>",
             "<h2>Artifacts (sorted by latency)</h2>", table(*summary_table(rows), numeric_from=6),
             "<p class=note>Latency: warm-up, then timed iterations; p50/p90/p99 over iterations (full numbers in "
             "report.json). CPU timings use the thread count shown in the device column.</p>"]
    if parity_table(rows)[1]:
        parts += ["<h2>Runtime parity (vs ONNX Runtime, parity images)</h2>", table(*parity_table(rows), numeric_from=4)]
    flags = report.get("flags") or []
    if flags:
        parts += ["<h2>Flags</h2>", "<div class=flags><ul>"]
        parts += [f"<li><b>{esc(f['artifact'])}</b>: {esc(f['message'])}</li>" for f in flags]
        parts.append("</ul></div>")
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        parts += ["<h2>Skipped or failed</h2>",
                  table(["artifact", "runtime", "precision", "status", "why"],
                        [[r["name"], r["runtime"], r["precision"], r["status"], r["reason"] or ""] for r in others])]
    if png:
        parts += ["<h2>Accuracy vs latency</h2>",
                  f"<img alt='accuracy vs latency' src='data:image/png;base64,{base64.b64encode(png).decode()}'>"]
    parts += ["<h2>Stages</h2>", table(*stages_table(report), numeric_from=3), f"<p>{esc(_wall_line(report))}</p>"]
    if layer_texts:
        parts += ["<h2>Per-layer tables</h2>"] + [f"<details><summary>{esc(name)}</summary><pre>{esc(text)}</pre></details>"
                                                  for name, text in layer_texts.items()]
    facts = [[k, v] for k, v in machine.items() if k != "versions"] + list(machine.get("versions", {}).items())
    parts += ["<h2>Machine</h2>", table(["", ""], [[k, "-" if v is None else v] for k, v in facts])]
    parts += ["<h2>Pipeline</h2>", f"<pre>{esc(report['pipeline']['yaml'].rstrip())}</pre>", "</body></html>", ""]
    return "\n".join(parts)
