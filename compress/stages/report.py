"""`report`: report.json (the machine-readable source), report.md and pareto.png.

One row per artifact and runtime; the plot puts accuracy against latency at the smallest
batch size, one point per row, with the Pareto front (no other row both faster and more
accurate) marked.
"""

from __future__ import annotations

import io
from datetime import datetime, timezone
from pathlib import Path

from compress.io import atomic_write_bytes, atomic_write_json, atomic_write_text

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


def _plot_batch(rows: list[dict]) -> str | None:
    sizes = sorted({int(b) for r in _ok(rows) for b in r["latency_ms"]})
    return str(sizes[0]) if sizes else None


def plot_pareto(rows: list[dict], title: str) -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batch = _plot_batch(rows)
    ok = [r for r in _ok(rows) if batch in r["latency_ms"]]
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=120)
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
    ax.set_xscale("log")
    ax.set_xlabel(f"latency p50 at batch {batch} (ms, log scale)")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
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
    ok = _ok(rows)
    batches = sorted({int(b) for r in ok for b in r["latency_ms"]})
    first = str(batches[0]) if batches else None
    lines = [f"# compress report: {report['pipeline']['name']}", "",
             f"Created {report['created']} from `{report['pipeline']['file']}` on **{machine.get('cpu')}**"
             f" ({machine.get('cpu_count')} cores, torch threads {machine.get('torch_threads')}), "
             f"GPU: {machine.get('gpu') or 'none'}.", ""]
    lines += ["## Artifacts (sorted by latency)", ""]
    head = ["artifact", "stage", "model", "runtime", "precision", "device", "top-1 %", "params", "MACs", "size"]
    for b in batches:
        head += [f"p50 / p99 ms @{b}", f"img/s @{b}"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    key = (lambda r: r["latency_ms"][first]["p50"]) if first else (lambda r: 0)
    for r in sorted(ok, key=key):
        cells = [r["name"], r["stage"], r["model"], r["runtime"], r["precision"], r.get("device", ""),
                 f"{r['accuracy']:.2f}", _fmt_count(r["params"]), _fmt_count(r["macs"]), _fmt_bytes(r["size_bytes"])]
        for b in batches:
            lat = r["latency_ms"].get(str(b))
            cells += [f"{lat['p50']:.3f} / {lat['p99']:.3f}" if lat else "-",
                      f"{r['throughput_ips'][str(b)]:,.0f}" if lat else "-"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "Latency: warm-up, then timed iterations; p50/p90/p99 over iterations "
              "(full numbers in report.json). CPU timings use the thread count shown in the device column.", ""]
    others = [r for r in rows if r["status"] != "ok"]
    if others:
        lines += ["## Skipped or failed", "", "| artifact | runtime | precision | status | why |", "|---|---|---|---|---|"]
        lines += [f"| {r['name']} | {r['runtime']} | {r['precision']} | {r['status']} | {r['reason']} |" for r in others]
        lines.append("")
    lines += ["## Accuracy vs latency", "", "![accuracy vs latency](pareto.png)", ""]
    lines += ["## Stages", "", "| stage | type | from | best val top-1 % | ONNX max abs diff | ONNX top-1 agreement | wall s |",
              "|---|---|---|---|---|---|---|"]
    for name, s in report["stages"].items():
        parity = s.get("onnx_parity") or {}
        diff = parity.get("max_abs_diff")
        agree = parity.get("top1_agreement")
        val = s.get("best_accuracy")
        lines.append(f"| {name} | {s['type']} | {', '.join(s['from']) or '-'} | "
                     f"{'-' if val is None else f'{val:.2f}'} | {'-' if diff is None else f'{diff:.2e}'} | "
                     f"{'-' if agree is None else f'{agree * 100:.1f}%'} | {s['wall_seconds']:.1f} |")
    total = report["wall_seconds"].get("total")
    lines += ["", f"Benchmark: {report['wall_seconds'].get('benchmark', 0):.1f} s. "
              f"Whole run: {total:.1f} s (stages reused from cache count 0)." if total else "", ""]
    lines += ["## Machine", "", "| | |", "|---|---|"]
    lines += [f"| {k} | {v} |" for k, v in machine.items() if k != "versions"]
    lines += [f"| {k} | {v} |" for k, v in machine.get("versions", {}).items()]
    lines += ["", "## Pipeline", "", "```yaml", report["pipeline"]["yaml"].rstrip(), "```", ""]
    return "\n".join(lines)


def run(cfg, ctx, rows: list[dict], *, stage_times: dict, pipeline_path: Path) -> Path:
    from compress.stages.benchmark import machine_info

    out = Path(cfg.report.dir) / cfg.name
    stages = {}
    for name, art in ctx.artifacts.items():
        stages[name] = {"type": art.stage, "from": cfg.inputs(name), "model": art.model,
                        "best_accuracy": art.metrics.get("best_accuracy"),
                        "onnx_parity": art.metrics.get("onnx_parity"),
                        "wall_seconds": round(stage_times.get(name, 0.0), 2),
                        "metrics": {k: v for k, v in art.metrics.items() if k != "history"}}
    report = {
        "schema": SCHEMA,
        "pipeline": {"name": cfg.name, "file": str(pipeline_path), "yaml": Path(pipeline_path).read_text(),
                     "config": cfg.model_dump(mode="json", by_alias=True)},
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "wall_seconds": {k: round(v, 2) for k, v in stage_times.items()},
        "stages": stages,
        "artifacts": rows,
    }
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "pareto.png", plot_pareto(rows, f"{cfg.name}: accuracy vs latency"))
    atomic_write_text(out / "report.md", render_markdown(report))
    return out
