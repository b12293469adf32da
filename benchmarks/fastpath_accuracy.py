"""Does the CPU fast path cost accuracy? A pipeline run per (seed, mode), test top-1 side by side.

Issue 18's bar: bf16 training must not cost more than 0.2 point of test top-1 on any model of
the default pipeline (teacher and students, 2 seeds); where it does, `cpu_fast_path: auto`
must not pick bf16 for that model. This script runs `compress run PIPELINE` once per seed and
mode with every training stage's `cpu_fast_path` set to the mode (each in its own run
directory, so nothing is shared between them), then tabulates each stage's test top-1 (the
torch benchmark row of its model, scored in fp32: `benchmark.cpu_fast_path: off`) and the
mean difference to `off` (fp32).

bf16 needs a CPU with native bf16 (AMX or AVX-512 BF16) to mean anything: elsewhere PyTorch
emulates it (bf16 rounding with fp32 arithmetic in other kernels), many times slower and not
the numerics an AMX core produces. Without native bf16 the script refuses (exit 2) unless
`--allow-emulated`.

    python benchmarks/fastpath_accuracy.py                     # ~45 min on a 2-core AMX machine
    python benchmarks/fastpath_accuracy.py --seeds 0 --set stages.teacher.epochs=1 --allow-emulated   # smoke
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import fastpath  # noqa: E402
from compress.config import ConfigError, OptimConfig, load  # noqa: E402
from compress.io import atomic_write_json, atomic_write_text  # noqa: E402
from compress.runtime import machine_info  # noqa: E402

BUDGET = 0.2   # points of test top-1 bf16 may cost on a model before auto must not pick it there


def fail(message: str) -> None:
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(2)


def training_stages(pipeline: Path, overrides: list[str]) -> list[str]:
    cfg = load(pipeline, overrides)
    return [name for name, stage in cfg.stages.items() if isinstance(stage, OptimConfig)]


def test_top1(report: dict) -> dict[str, float]:
    """Each stage's test top-1 from its torch fp32 benchmark row (the int8 stages: onnxruntime)."""
    out = {}
    for row in report["artifacts"]:
        if row.get("status") == "ok" and row["name"] not in out and row["runtime"] in ("torch", "onnxruntime"):
            out[row["name"]] = row["accuracy"]
    return out


def markdown(result: dict) -> str:
    m = result["machine"]
    modes = result["modes"]
    lines = ["# Test top-1 with and without the CPU fast path", "",
             (f"CPU: {m['cpu']}; instruction sets: {', '.join(m['isa']) or 'unknown'}; "
              f"{'native bf16' if m['native_bf16'] else 'NO native bf16: bf16 was emulated'}. Pipeline "
              f"`{result['pipeline']}`, seeds {', '.join(map(str, result['seeds']))}; each stage's test top-1 "
              f"(%, mean over seeds) and the mean difference to `{modes[0]}`."), "",
             "| stage | " + " | ".join(modes) + " | " + " | ".join(f"{k} - {modes[0]}" for k in modes[1:]) + " |",
             "|---|" + "---:|" * (2 * len(modes) - 1)]
    for stage, by_mode in result["top1"].items():
        means = [statistics.mean(by_mode[k]) for k in modes]
        deltas = [f"{means[i] - means[0]:+.2f}" for i in range(1, len(modes))]
        lines.append(f"| {stage} | " + " | ".join(f"{v:.2f}" for v in means) + " | " + " | ".join(deltas) + " |")
    lines += [""]
    if result["over_budget"]:
        lines += [f"Costs more than {BUDGET} point: " + ", ".join(
            f"{s} ({k}: {d:+.2f})" for s, k, d in result["over_budget"]) + " - auto must not pick bf16 there.", ""]
    else:
        lines += [f"No stage lost more than {BUDGET} point with any mode.", ""]
    lines += [f"Command: `{result['command']}`", ""]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pipeline", type=Path, default=ROOT / "pipelines" / "distill.yaml")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--modes", default="off,bf16_channels_last",
                    help="cpu_fast_path values to compare; the first is the reference (default off: fp32)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra key.path=value overrides")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "fastpath-accuracy")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--name", default="fastpath_accuracy")
    ap.add_argument("--allow-emulated", action="store_true",
                    help="run bf16 modes on a CPU without native bf16 (slow, and not native numerics)")
    args = ap.parse_args()
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        fail(f"--seeds {args.seeds!r}: expected integers separated by commas, e.g. 0,1")
    modes = args.modes.split(",")
    bad = [m for m in modes if m not in fastpath.SETTINGS or m == "auto"]
    if bad or len(modes) < 2:
        fail(f"--modes {args.modes!r}: expected two or more of {', '.join(s for s in fastpath.SETTINGS if s != 'auto')}")
    if any(m.startswith("bf16") for m in modes) and not fastpath.native_bf16() and not args.allow_emulated:
        fail("this CPU has no native bf16 (AMX / AVX-512 BF16): bf16 would be emulated, slowly and with other "
             "numerics than a bf16 chip; run this on an AMX machine, or pass --allow-emulated")
    if not args.pipeline.is_file():
        fail(f"--pipeline {args.pipeline}: no such file")
    try:
        stages = training_stages(args.pipeline, args.overrides)
    except ConfigError as exc:
        fail(str(exc))
    top1: dict[str, dict[str, list[float]]] = {}
    for seed in seeds:
        for mode in modes:
            run_root, reports = args.runs / f"{mode}-seed{seed}", args.runs / f"{mode}-seed{seed}-reports"
            cmd = [sys.executable, "-m", "compress", "run", str(args.pipeline), "--out", str(run_root),
                   "--reports", str(reports), "--no-progress", "--set", f"seed={seed}",
                   *(a for s in stages for a in ("--set", f"stages.{s}.cpu_fast_path={mode}")),
                   "--set", "benchmark.cpu_fast_path=off",   # test top-1 scored in fp32 in every arm
                   *(a for o in args.overrides for a in ("--set", o))]
            print(f"seed {seed}, {mode}: {' '.join(cmd[1:])}", flush=True)
            t0 = time.perf_counter()
            if subprocess.run(cmd, cwd=ROOT, check=False).returncode != 0:
                fail(f"the run for seed {seed}, {mode} failed (see above)")
            report = json.loads(next(reports.glob("*/report.json")).read_text())
            for stage, acc in test_top1(report).items():
                top1.setdefault(stage, {m: [] for m in modes})[mode].append(acc)
            print(f"seed {seed}, {mode}: done in {time.perf_counter() - t0:.0f} s", flush=True)
    over = []
    for stage, by_mode in top1.items():
        ref = statistics.mean(by_mode[modes[0]])
        over += [(stage, m, statistics.mean(by_mode[m]) - ref) for m in modes[1:]
                 if m.startswith("bf16") and statistics.mean(by_mode[m]) - ref < -BUDGET]
    result = {"schema": "compress.benchmark.fastpath_accuracy/1",
              "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": "python benchmarks/fastpath_accuracy.py " + " ".join(sys.argv[1:]),
              "pipeline": str(args.pipeline.relative_to(ROOT) if args.pipeline.resolve().is_relative_to(ROOT)
                              else args.pipeline),
              "seeds": seeds, "modes": modes, "stages_set": stages,
              "machine": {**machine_info(), "isa": fastpath.isa(), "native_bf16": fastpath.native_bf16()},
              "top1": top1, "over_budget": over}
    args.out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out / f"{args.name}.json", result)
    atomic_write_text(args.out / f"{args.name}.md", markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
