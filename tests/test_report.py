"""Pareto front and report rendering on hand-made rows."""

from compress.stages.report import pareto_front, plot_pareto, render_markdown


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
    table = [l for l in md.splitlines() if l.startswith("| student") or l.startswith("| teacher")]
    assert table[0].startswith("| student | train | m | onnxruntime")  # sorted by latency
    assert "| student | tensorrt | fp32 | skipped | no GPU |" in md
    assert "pareto.png" in md
