"""Pareto front and report rendering on hand-made rows."""

from compress.reporting import pareto_front, plot_pareto, render_markdown


def row(name, runtime, acc, p50, status="ok"):
    lat = {"1": {"p50": p50, "p90": p50 * 1.1, "p99": p50 * 1.2, "mean": p50}} if status == "ok" else {}
    return {"name": name, "stage": "train", "parent": None, "model": "m", "runtime": runtime, "precision": "fp32",
            "device": "cpu", "params": 1000, "macs": 2_000_000, "size_bytes": 4096, "accuracy": acc,
            "latency_ms": lat, "throughput_ips": {"1": 1000 / p50} if p50 else {}, "status": status,
            "reason": None if status == "ok" else "no GPU"}


def test_pareto_front_keeps_only_undominated_points():
    # (latency, accuracy): b is dominated by a (slower and worse); d ties c on latency but is worse.
    pts = [(1.0, 90.0), (2.0, 89.0), (3.0, 95.0), (3.0, 94.0), (0.5, 80.0)]
    assert pareto_front(pts) == [4, 0, 2]


def test_plot_and_markdown_render(tmp_path):
    rows = [row("teacher", "torch", 92.0, 5.0), row("student", "onnxruntime", 90.0, 0.5),
            row("student", "tensorrt", None, None, status="skipped")]
    png = plot_pareto(rows, "t")
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    report = {"pipeline": {"name": "p", "file": "p.yaml", "yaml": "name: p\n"}, "created": "now",
              "machine": {"cpu": "x86", "cpu_count": 2, "torch_threads": 2, "gpu": None, "versions": {"torch": "2"}},
              "artifacts": rows, "wall_seconds": {"total": 3.0, "benchmark": 1.0},
              "stages": {"teacher": {"type": "train", "from": [], "best_accuracy": 91.5,
                                     "onnx_parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0}, "wall_seconds": 2.0}}}
    md = render_markdown(report)
    table = [ln for ln in md.splitlines() if ln.startswith("| student") or ln.startswith("| teacher")]
    assert table[0].startswith("| student | train | m | onnxruntime")  # sorted by latency
    assert "| student | tensorrt | fp32 | skipped | no GPU |" in md
    assert "pareto.png" in md


def lat_row(name, runtime, precision, p50s, parent=None, acc=90.0, stage="train"):
    r = row(name, runtime, acc, 1.0)
    r.update(precision=precision, parent=parent, stage=stage,
             latency_ms={str(b): {"p50": p, "p90": p, "p99": p, "mean": p} for b, p in p50s.items()},
             throughput_ips={str(b): b * 1000 / p for b, p in p50s.items()})
    return r


FLAG_ROWS = [
    lat_row("student", "onnxruntime", "fp32", {1: 0.1, 8: 0.25}),
    lat_row("student-int8", "onnxruntime", "int8", {1: 0.5, 8: 0.2}, parent="student", stage="quantize"),
    lat_row("student", "tensorrt", "fp32", {1: 0.09, 8: 0.12}),
    lat_row("student", "tensorrt", "fp16", {1: 0.05, 8: 0.10}),
    lat_row("student-int8", "tensorrt", "int8", {1: 0.06, 8: 0.08}, parent="student", stage="quantize"),
    row("student-int8", "torch", None, None, status="skipped"),
]


def test_int8_not_faster_is_flagged_per_runtime_and_batch():
    from compress.reporting import int8_flags

    flags = int8_flags(FLAG_ROWS)
    got = {(f["artifact"], f["runtime"], f["batch"], f["reference"]["precision"]) for f in flags}
    # onnxruntime: slower than the parent's FP32 at batch 1 only; tensorrt: compared with FP16 (not FP32),
    # slower at batch 1 only.
    assert got == {("student-int8", "onnxruntime", 1, "fp32"), ("student-int8", "tensorrt", 1, "fp16")}
    ort = next(f for f in flags if f["runtime"] == "onnxruntime")
    assert ort["message"].startswith("INT8 is not faster than FP32 student on onnxruntime at batch 1")
    assert "0.500 ms vs 0.100 ms (5.0x)" in ort["message"]
    assert int8_flags([r for r in FLAG_ROWS if r["precision"] != "int8"]) == []


def _full_report(rows):
    from compress.reporting import int8_flags

    return {"pipeline": {"name": "p", "file": "p.yaml", "yaml": "name: p  # <b>not html</b>\n"}, "created": "now",
            "machine": {"cpu": "x86", "cores": 2, "torch_threads": 2, "gpu": None, "versions": {"torch": "2"}},
            "artifacts": rows, "wall_seconds": {"total": 3.0, "benchmark": 1.0}, "flags": int8_flags(rows),
            "stages": {"student": {"type": "train", "from": [], "best_accuracy": 91.5,
                                   "onnx_parity": {"max_abs_diff": 1e-6, "top1_agreement": 1.0}, "wall_seconds": 2.0}}}


def test_html_is_self_contained_and_matches_the_markdown():
    import base64
    import re

    from compress.reporting import render_html

    report = _full_report(FLAG_ROWS)
    png = plot_pareto(FLAG_ROWS, "t")
    page = render_html(report, png)
    md = render_markdown(report)
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # No external assets: the only src is the inlined plot, no stylesheet links or scripts.
    assert re.findall(r"src='([^']{0,22})", page) == ["data:image/png;base64,"]
    assert "<link" not in page and "<script" not in page and "http" not in page
    inlined = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)", page).group(1)
    assert base64.b64decode(inlined) == png
    # Same summary rows, same order, as the markdown table.
    md_table = md.split("## Artifacts (sorted by latency)")[1].split("\n\n")[1].splitlines()[2:]
    md_rows = [[c.strip() for c in line.strip("|").split(" | ")] for line in md_table]
    html_table = page.split("<h2>Artifacts (sorted by latency)</h2>")[1].split("</table>")[0]
    html_rows = [re.findall(r"<td[^>]*>([^<]*)</td>", tr) for tr in html_table.split("<tr>") if "<td" in tr]
    assert html_rows == md_rows and len(html_rows) == 5
    assert [r[4] for r in html_rows] == ["fp16", "int8", "fp32", "fp32", "int8"]   # by p50 at batch 1
    # Flags, skipped rows with reasons, stage wall times, machine and escaped YAML are all there.
    assert "INT8 is not faster than FP32 student on onnxruntime at batch 1" in page
    assert "INT8 is not faster than FP32 student on onnxruntime at batch 1" in md and "## Flags" in md
    assert "<td>skipped</td><td>no GPU</td>" in page
    # the wall seconds, then the mode the stage trained with (compress.fastpath; "-" when not recorded)
    assert re.search(r"<td class=num>2\.0</td><td[^>]*>-</td></tr>", page) and "Whole run: 3.0 s" in page
    assert "name: p  # &lt;b&gt;not html&lt;/b&gt;" in page and "<b>not html</b>" not in page
    assert "(2 cores, torch threads 2), GPU: none" in page and "(2 cores, torch threads 2)" in md


def test_run_writes_json_md_html_and_png(tmp_path):
    import json
    from pathlib import Path
    from types import SimpleNamespace

    from compress import config
    from compress.stages import report as report_stage

    root = Path(__file__).parents[1]
    cfg = config.load(root / "pipelines/smoke.yaml", [f"report.dir={tmp_path / 'reports'}"])
    data = SimpleNamespace(summary=lambda: {"name": "synthetic", "preprocess": {"size": [16, 16], "channels": 1}})
    ctx = SimpleNamespace(artifacts={}, run_dir=tmp_path / "runs" / "smoke", data=data, rows=FLAG_ROWS,
                          stage_times={"benchmark": 1.0, "total": 2.0}, pipeline_path=root / "pipelines/smoke.yaml",
                          reused=frozenset())
    out = report_stage.run(cfg, ctx)
    assert sorted(p.name for p in out.iterdir()) == ["pareto.png", "report.html", "report.json", "report.md"]
    saved = json.loads((out / "report.json").read_text())
    assert len(saved["flags"]) == 2 and {"artifact", "runtime", "batch", "message"} <= set(saved["flags"][0])
    assert saved["run_dir"] == str(tmp_path / "runs" / "smoke")
    assert saved["data"]["preprocess"]["size"] == [16, 16]
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_plot_with_nothing_benchmarked_is_a_png_not_a_crash():
    # benchmark.runtimes: [] leaves no latency to put on the log axis
    from compress.reporting import plot_pareto

    assert plot_pareto([], "empty")[:4] == b"\x89PNG"


def test_stages_table_names_the_fast_path_of_a_qat_stage():
    """QAT's training facts sit under metrics.qat; its fast path is the stage's as much as a train stage's."""
    from compress.reporting import stages_table

    base = {"from": ["t"], "wall_seconds": 1.0, "onnx_parity": None, "best_accuracy": None}
    report = {"stages": {
        "t": {**base, "from": [], "type": "train", "metrics": {"fast_path": {"mode": "channels_last"}}},
        "q": {**base, "type": "quantize", "metrics": {"qat": {"fast_path": {"mode": "bf16"}}}},
        "p": {**base, "type": "quantize", "metrics": {"backend": "nncf"}},   # PTQ: no training, no fast path
    }}
    head, body = stages_table(report)
    column = head.index("trained with")
    assert [row[column] for row in body] == ["channels_last", "bf16", "-"]


def test_a_rerun_reports_reused_stages_with_the_time_they_took_to_build():
    """Run again, a pipeline reuses its stages: the report says so and keeps what building them cost."""
    from compress.reporting import _wall_line, stages_table

    stages = {"t": {"type": "train", "from": [], "wall_seconds": 0.0, "reused": True, "built_seconds": 409.0,
                    "onnx_parity": None, "best_accuracy": 90.9, "metrics": {}},
              "p": {"type": "prune", "from": ["t"], "wall_seconds": 12.5, "reused": False, "built_seconds": 12.5,
                    "onnx_parity": None, "best_accuracy": 88.0, "metrics": {}}}
    head, body = stages_table({"stages": stages})
    wall = head.index("wall s")
    assert [row[wall] for row in body] == ["reused (409.0 when built)", "12.5"]
    line = _wall_line({"stages": stages, "wall_seconds": {"benchmark": 90.0, "total": 110.0}})
    assert line == ("Benchmark: 90.0 s. Whole run: 110.0 s (1 of 2 stages reused from the cache; building them took "
                    "409.0 s).")
    stages["t"]["reused"] = False
    assert _wall_line({"stages": stages, "wall_seconds": {"benchmark": 90.0, "total": 110.0}}).endswith("110.0 s.")


def test_a_stage_resumed_over_several_runs_reports_its_training_over_all_of_them():
    """A long stage run in parts (Ctrl-C, then `compress run` again) has the last run's wall time; the report
    also shows the training time its checkpoint carried over, so a run in parts does not look shorter."""
    from compress.reporting import _wall_line, stages_table

    stages = {"s": {"type": "distill", "from": ["t"], "wall_seconds": 1291.5, "reused": False,
                    "built_seconds": 1291.5, "onnx_parity": None, "best_accuracy": 91.3,
                    "metrics": {"train_seconds": 2963.6}},
              "p": {"type": "prune", "from": ["s"], "wall_seconds": 736.4, "reused": False, "built_seconds": 736.4,
                    "onnx_parity": None, "best_accuracy": 90.1, "metrics": {"train_seconds": 715.8}}}
    head, body = stages_table({"stages": stages})
    wall = head.index("wall s")
    assert [row[wall] for row in body] == ["1291.5 (resumed; trained 2963.6 over all runs)", "736.4"]
    line = _wall_line({"stages": stages, "wall_seconds": {"benchmark": 90.0, "total": 2118.0}})
    assert "Whole run: 2118.0 s; 1 resumed from a checkpoint" in line
    stages["s"].update(reused=True, wall_seconds=0.0)     # the next run reuses it: the span stays visible
    head, body = stages_table({"stages": stages})
    assert body[0][wall] == "reused (1291.5 when built; trained 2963.6 over all runs)"
    del stages["s"]["built_seconds"]                     # a report from before built_seconds: no claim made
    head, body = stages_table({"stages": stages})
    assert body[0][wall] == "0.0"
    assert "resumed" not in _wall_line({"stages": stages, "wall_seconds": {"benchmark": 90.0, "total": 826.4}})
