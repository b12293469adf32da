"""The teachers' ensemble as a report row: several teachers, their logits averaged.

Users find that a few teachers averaged beat any one of them (Hansen & Salamon, 1990; the
"dark knowledge" of an ensemble is what Hinton et al., 2015, distil into one student). When a
pipeline has two or more teachers (stages that train or import a model from data alone, no
`from:`), the report gets one row per runtime for their average: accuracy of the averaged
logits on the benchmark split, scored once in PyTorch (FP32, the exported models agree with it
to the parity check), MACs and parameters summed, and latency as the members run one after the
other on that runtime (the sum of their latencies at each batch size: exact for the mean, an
upper bound for the percentiles). A multi-teacher distill stage
(`teacher: [a, b]` or `from: [a, b]`) then sits next to the ensemble it learns from.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TEACHER_STAGES = ("train", "import")


def teachers(artifacts: dict) -> list:
    """The artifacts that are teachers in their own right: trained or imported, not made from another stage."""
    return [a for a in artifacts.values() if a.stage in TEACHER_STAGES and a.parent is None and a.files.get("model")]


@torch.no_grad()
def accuracy(models: list[torch.nn.Module], batches) -> float:
    """Top-1 % of the averaged logits (each model's logits, then the mean) over (images, labels) batches."""
    correct = total = 0
    for x, y in batches:
        logits = torch.stack([m(x).float() for m in models]).mean(0)
        correct += int((logits.argmax(1) == y).sum())
        total += len(y)
    return 100.0 * correct / max(total, 1)


def rows(ctx, bench_rows: list[dict[str, Any]], split: str) -> list[dict[str, Any]]:
    """One row per runtime on which every teacher has an FP32 row that ran; none with fewer than two teachers."""
    from compress.io import load_model

    members = teachers(ctx.artifacts)
    if len(members) < 2:
        return []
    names = [m.name for m in members]
    models = [load_model(m.files["model"], base_dir=Path(ctx.base_dir)).to(ctx.device).eval() for m in members]
    acc = round(accuracy(models, ctx.data.eval_batches(split)), 2)
    ctx.log(f"[ensemble] {' + '.join(names)}: averaged logits top-1 {acc:.2f}% on {split}")
    out = []
    for runtime in dict.fromkeys(r["runtime"] for r in bench_rows):
        got = {r["name"]: r for r in bench_rows if r["runtime"] == runtime and r["precision"] == "fp32"
               and r["name"] in names and r["status"] == "ok"}
        if len(got) < len(names):
            continue
        batches = set.intersection(*(set(r["latency_ms"]) for r in got.values()))
        # run one after the other: the mean adds up exactly; the percentiles' sum bounds those of the total
        latency = {b: {k: round(sum(got[n]["latency_ms"][b].get(k, 0.0) for n in names), 4)
                       for k in ("p50", "p90", "p99", "mean")} for b in sorted(batches, key=int)}
        out.append({"name": "ensemble", "stage": "ensemble", "parent": None, "model": " + ".join(m.model for m in members),
                    "members": names, "runtime": runtime, "precision": "fp32", "device": got[names[0]].get("device"),
                    "params": _sum(m.params for m in members), "macs": _sum(m.macs for m in members),
                    "size_bytes": _sum(got[n].get("size_bytes") for n in names), "accuracy": acc,
                    "accuracy_from": "torch, averaged logits", "latency_ms": latency,
                    "throughput_ips": {b: round(1000.0 * int(b) / v["p50"], 1) for b, v in latency.items() if v["p50"]},
                    "timer": "sum of the members' latencies", "includes_copies": None, "status": "ok",
                    "reason": None, "file": None, "inference_precision": None, "parity": None})
    return out


def _sum(values) -> int | None:
    values = list(values)
    return None if any(v is None for v in values) else int(sum(values))
