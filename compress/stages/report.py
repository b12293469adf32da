"""`report` stage: writes report.json (the machine-readable source), report.md, report.html and
pareto.png into `<report.dir>/<name>/`; what goes into them is compress.reporting.
"""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

from compress.config import PipelineConfig
from compress.context import Context
from compress.io import atomic_write_bytes, atomic_write_json, atomic_write_text
from compress.reporting import (SCHEMA, int8_flags, parity_flags, plot_pareto, pruned_flags, render_html,
                                render_markdown)


def run(cfg: PipelineConfig, ctx: Context) -> Path:
    """Write the report of `ctx.rows` (the benchmark rows) with `ctx.stage_times`; returns its directory."""
    rows, stage_times, pipeline_path = ctx.rows, ctx.stage_times, Path(ctx.pipeline_path)
    from compress.runtime import machine_info

    out = Path(cfg.report.dir) / cfg.name
    stages = {}
    for name, art in ctx.artifacts.items():
        stages[name] = {"type": art.stage, "from": cfg.inputs(name), "model": art.model,
                        "best_accuracy": art.metrics.get("best_accuracy"),
                        "onnx_parity": art.metrics.get("onnx_parity"),
                        "wall_seconds": round(stage_times.get(name, 0.0), 2),
                        # taken from the cache: this run spent nothing on it; the run that built it did
                        "reused": name in ctx.reused, "built_seconds": art.metrics.get("wall_seconds"),
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
        "flags": int8_flags(rows) + pruned_flags(rows) + parity_flags(rows),
        # where the stage directories are, and what a deployed model must do to an image (`compress deploy`)
        "run_dir": str(ctx.run_dir),
        "data": ctx.data.summary() if ctx.data is not None else None,
    }
    # Per-layer tables (prune, quantize) are copied next to the report, so it stays readable without runs/.
    layer_texts = {}
    for name, art in ctx.artifacts.items():
        table_md = next((Path(f) for f in art.files.values() if Path(f).name == "layers.md"), None)
        if table_md is not None and table_md.is_file():
            layer_texts[name] = table_md.read_text()
            atomic_write_text(out / "layers" / f"{name}.md", layer_texts[name])
    report["layer_tables"] = {name: f"layers/{name}.md" for name in layer_texts}
    png = plot_pareto(rows, f"{cfg.name}: accuracy vs latency")
    atomic_write_json(out / "report.json", report)
    atomic_write_bytes(out / "pareto.png", png)
    atomic_write_text(out / "report.md", render_markdown(report))
    atomic_write_text(out / "report.html", render_html(report, png, layer_texts))
    return out
