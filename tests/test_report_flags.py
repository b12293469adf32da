"""The `pruned_not_faster` flag: a pruned model not faster than the model it was pruned from."""

from compress.reporting import int8_flags, pruned_flags, render_markdown


def row(name, runtime, precision, p50s, parent=None, stage="distill"):
    return {"name": name, "stage": stage, "parent": parent, "model": "m", "runtime": runtime,
            "precision": precision, "device": "cpu", "params": 1, "macs": 1, "size_bytes": 1, "accuracy": 90.0,
            "latency_ms": {str(b): {"p50": p, "p90": p, "p99": p, "mean": p} for b, p in p50s.items()},
            "throughput_ips": {str(b): b * 1000 / p for b, p in p50s.items()}, "status": "ok", "reason": None}


# seen: a pruned ShuffleNetV2 0.82 ms vs 0.58 ms unpruned at batch 1 on ONNX Runtime, faster at 64
ROWS = [row("shuf", "onnxruntime", "fp32", {1: 0.58, 64: 2.1}),
        row("shuf-pruned", "onnxruntime", "fp32", {1: 0.82, 64: 1.4}, parent="shuf", stage="prune"),
        row("shuf", "torch", "fp32", {1: 1.0, 64: 9.0}),
        row("shuf-pruned", "torch", "fp32", {1: 0.9, 64: 9.0}, parent="shuf", stage="prune"),   # a tie is flagged
        row("shuf-pruned", "tensorrt", "fp16", {1: 0.1}, parent="shuf", stage="prune"),         # no parent row
        row("shuf-int8", "onnxruntime", "int8", {1: 0.3, 64: 1.0}, parent="shuf-pruned", stage="quantize")]


def test_pruned_not_faster_per_runtime_and_batch():
    flags = pruned_flags(ROWS)
    assert {(f["artifact"], f["runtime"], f["batch"]) for f in flags} == {
        ("shuf-pruned", "onnxruntime", 1), ("shuf-pruned", "torch", 64)}
    ort = next(f for f in flags if f["runtime"] == "onnxruntime")
    assert ort["kind"] == "pruned_not_faster" and ort["reference"] == {"artifact": "shuf", "precision": "fp32"}
    assert ort["p50_ms"] == 0.82 and ort["reference_p50_ms"] == 0.58
    assert "not faster than shuf (FP32) on onnxruntime at batch 1: p50 0.820 ms vs 0.580 ms (1.41x)" in ort["message"]
    # the INT8 row is int8_flags' business, and a non-prune row is never flagged here
    assert all(f["artifact"] == "shuf-pruned" for f in flags) and int8_flags(ROWS) == []
    assert pruned_flags([r for r in ROWS if r["stage"] != "prune"]) == []


def test_flag_is_shown_in_the_report():
    report = {"pipeline": {"name": "p", "file": "p.yaml", "yaml": "name: p\n"}, "created": "now",
              "machine": {"cpu": "x86", "cores": 2, "torch_threads": 2, "gpu": None, "versions": {}},
              "artifacts": ROWS, "wall_seconds": {"total": 1.0, "benchmark": 1.0}, "stages": {},
              "flags": int8_flags(ROWS) + pruned_flags(ROWS)}
    md = render_markdown(report)
    assert "## Flags" in md and "- **shuf-pruned**: pruned, but not faster than shuf (FP32) on onnxruntime" in md
