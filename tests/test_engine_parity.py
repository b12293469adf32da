"""Engine rows carry parity figures against ONNX Runtime on the ONNX they came from.

TensorRT is not here: stand-in runners produce the logits a benchmark worker would save (an
FP16 run of the same network, and a broken one), and the benchmark's comparison and the
report's flag and table are checked on them.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from compress.scoring import PARITY_MIN_AGREEMENT, compare_outputs
from compress.reporting import parity_flags, parity_table, render_markdown


def _row(name, runtime, precision, logits_file=None):
    row = {"name": name, "stage": "distill", "parent": None, "model": "m", "runtime": runtime,
           "precision": precision, "device": "cuda", "params": 1, "macs": 1, "size_bytes": 1, "accuracy": 90.0,
           "latency_ms": {"1": {"p50": 0.1, "p90": 0.1, "p99": 0.1, "mean": 0.1}}, "throughput_ips": {"1": 1e4},
           "status": "ok", "reason": None}
    if logits_file:
        row["_parity"] = row["_parity_kept"] = str(logits_file)
    return row


def _save(tmp_path, name, logits: torch.Tensor):
    path = tmp_path / f"{name}.npy"
    np.save(path, logits.detach().float().numpy())
    return path


def test_engine_rows_get_parity_and_a_broken_engine_is_flagged(tmp_path):
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)).eval()
    images = torch.randn(256, 1, 8, 8)
    with torch.no_grad():
        ort = net(images)                                                     # the ONNX on ONNX Runtime
        fp16 = net.to(torch.bfloat16)(images.to(torch.bfloat16)).float()     # an engine at reduced precision
        broken = torch.roll(ort, shifts=1, dims=1)                             # an engine that mislabels
    rows = [_row("s", "onnxruntime", "fp32", _save(tmp_path, "ort", ort)),
            _row("s", "tensorrt", "fp16", _save(tmp_path, "trt16", fp16)),
            _row("t", "onnxruntime", "fp32", _save(tmp_path, "ort_t", ort)),
            _row("t", "tensorrt", "fp32", _save(tmp_path, "trt_t", broken)),
            _row("u", "tensorrt", "int8", _save(tmp_path, "trt_u", ort))]    # no ONNX Runtime row to compare with
    logs = []
    compare_outputs(rows, logs.append)
    s16, broken_row, lone = rows[1], rows[3], rows[4]

    # the FP16 engine is compared with the FP32 ONNX it was cast from, with the real figures
    p = s16["parity"]
    assert p["reference"] == "onnxruntime" and p["reference_precision"] == "fp32" and p["n"] == 256
    expected_diff = float((fp16 - ort).abs().max())
    expected_agree = float((fp16.argmax(1) == ort.argmax(1)).float().mean())
    assert abs(p["max_abs_diff"] - expected_diff) < 1e-4 and 0 < p["max_abs_diff"] < 0.5
    assert abs(p["top1_agreement"] - expected_agree) < 1e-4 and p["top1_agreement"] >= PARITY_MIN_AGREEMENT["fp16"]
    assert s16["status"] == "ok"
    # a broken engine fails its row, and the report flags it
    assert broken_row["parity"]["top1_agreement"] < 0.5 and broken_row["status"] == "failed"
    assert "outputs disagree with onnxruntime" in broken_row["reason"] and logs
    assert lone["parity"] is None and rows[0]["parity"] is None   # nothing to compare; the reference itself
    assert all("_parity" not in r and "_parity_kept" not in r for r in rows)

    flags = parity_flags(rows)
    assert [(f["artifact"], f["runtime"], f["kind"]) for f in flags] == [("t", "tensorrt", "outputs_disagree")]
    head, body = parity_table(rows)
    assert head[4:6] == ["max abs diff", "top-1 agreement"]
    assert [b[:4] for b in body] == [["s", "tensorrt", "fp16", "onnxruntime fp32"],
                                     ["t", "tensorrt", "fp32", "onnxruntime fp32"]]
    report = {"pipeline": {"name": "p", "file": "p.yaml", "yaml": "name: p\n"}, "created": "now",
              "machine": {"cpu": "x", "gpu": "H200", "versions": {}}, "artifacts": rows,
              "wall_seconds": {"total": 1.0, "benchmark": 1.0}, "stages": {}, "flags": flags}
    md = render_markdown(report)
    assert "## Runtime parity (vs ONNX Runtime, parity images)" in md
    assert f"| s | tensorrt | fp16 | onnxruntime fp32 | {p['max_abs_diff']:.2e} |" in md
    assert "- **t**: tensorrt FP32 agrees with onnxruntime FP32 on" in md
