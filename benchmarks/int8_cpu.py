"""Is INT8 faster than float on this CPU? Every CPU runtime and INT8 format, side by side.

For each model: its FP32 ONNX, the TensorRT QDQ file (signed int8, float biases; what the
quantize stage has always written) and the CPU form (compress.quant.cpu_int8: QDQ U8S8,
per-channel, int32 biases), all from one set of calibration images, run on

* ONNX Runtime: FP32, INT8 TensorRT QDQ, INT8 CPU form;
* OpenVINO: FP32 (INFERENCE_PRECISION_HINT f32, recorded), INT8 CPU form, INT8 TensorRT QDQ;
* PyTorch eager FP32 (the teacher in PyTorch is the "over the teacher" baseline),

at each batch size and thread count, repeats interleaved (every runner once per round, so a
noisy neighbour slows all rows alike), median of the rounds' p50. Speed-ups are over the FP32
row of the same runtime and over the teacher in PyTorch at the same batch and threads.

Models: `--run-dir` takes the default pipeline's trained artifacts (runs/fashion-distill: the
students, pruned students and teacher; accuracy on `--accuracy-images` test images for every
row, and each INT8 row against its float parent), and `--models` adds registry models at a
real resolution with their random initial weights (speed only; calibrated on random images),
e.g. resnet18 at 3x64x64 (149 MMACs) and mobilenetv2_x1_0 at 3x96x96 (209 MMACs).

    python benchmarks/int8_cpu.py --run-dir runs/fashion-distill          # the full table
    python benchmarks/int8_cpu.py --tiny --out /tmp/int8_cpu               # a smoke run (~1 min)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from datetime import datetime, timezone
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from compress import fastpath  # noqa: E402
from compress.io import load_model  # noqa: E402
from compress.onnx_export import export_onnx  # noqa: E402
from compress.quant.cpu_int8 import cpu_qdq  # noqa: E402
from compress.quant.ort_ptq import quantize_ort  # noqa: E402
from compress.registry import count_macs, create_model  # noqa: E402
from compress.runtime import OpenVinoRunner, OrtRunner, TorchRunner, machine_info, measure_latency  # noqa: E402

BIG_MODELS = ["resnet18:3x64x64", "mobilenetv2_x1_0:3x96x96"]
# Without --run-dir: the default pipeline's architectures (random weights) stand in for its models.
PIPELINE_MODELS = ["resnet20:1x28x28", "mobilenetv2_x0_35:1x28x28", "shufflenetv2_x0_5:1x28x28"]
# (runtime, precision, file key): the rows every model gets
ROWS = [("torch", "fp32", "model"), ("onnxruntime", "fp32", "onnx"), ("onnxruntime", "int8", "onnx_int8"),
        ("onnxruntime", "int8", "onnx_int8_cpu"), ("openvino", "fp32", "onnx"), ("openvino", "int8", "onnx_int8_cpu"),
        ("openvino", "int8", "onnx_int8")]
FORMAT = {"model": "PyTorch eager", "onnx": "FP32 ONNX", "onnx_int8": "INT8 QDQ s8 (TensorRT file)",
          "onnx_int8_cpu": "INT8 QDQ u8s8 + int32 bias (CPU form)"}


def _import_models():
    import students.mobilenetv2  # noqa: F401
    import students.mobilenetv3  # noqa: F401
    import students.shufflenetv2  # noqa: F401
    import teachers.resnet  # noqa: F401


def _pipeline_models(run_dir: Path, n_images: int) -> tuple[list[dict], dict | None]:
    """Trained float artifacts of a `compress run` directory, with Fashion-MNIST test images."""
    from compress.config import DataConfig
    from compress.data import build_data

    found = []
    for manifest in sorted(run_dir.glob("*/manifest.json")):
        art = json.loads(manifest.read_text())["artifact"]
        if art.get("precision", "fp32") == "fp32" and art["files"].get("model") and art["files"].get("onnx"):
            found.append(art)
    if not found:
        raise SystemExit(f"error: {run_dir}: no trained float artifacts (run `compress run` first)")
    data = build_data(DataConfig(), torch.device("cpu"), 0, log=lambda m: None)
    x, y = data.images("test", n_images)
    calib = data.calibration_subset("train", 300, 0).cpu()
    return [{"name": a["name"], "parent": a.get("parent"), "model_file": a["files"]["model"],
             "shape": tuple(x.shape[1:]), "calib": calib} for a in found], {"x": x, "y": y}


def _build(spec: dict, work: Path) -> dict:
    """FP32 ONNX, TensorRT QDQ and CPU INT8 form of one model, from the same calibration images."""
    model = load_model(spec["model_file"]) if "model_file" in spec else spec["module"]
    model = model.eval()
    d = work / spec["name"]
    d.mkdir(parents=True, exist_ok=True)
    export_onnx(model, d / "model.onnx", spec["shape"])
    calib = spec["calib"]
    quantize_ort(d / "model.onnx", calib, d / "model_int8.onnx", subset_size=len(calib))
    cpu_qdq(d / "model.onnx", calib, d / "model_int8_cpu.onnx", subset_size=len(calib))
    return {"module": model, "files": {"model": None, "onnx": str(d / "model.onnx"),
                                       "onnx_int8": str(d / "model_int8.onnx"),
                                       "onnx_int8_cpu": str(d / "model_int8_cpu.onnx")},
            "macs": count_macs(model, spec["shape"])}


def _runner(runtime: str, key: str, built: dict, threads: int):
    if runtime == "torch":
        return TorchRunner(built["module"])
    if runtime == "onnxruntime":
        return OrtRunner(built["files"][key], threads=threads)
    return OpenVinoRunner(built["files"][key], threads=threads)


def _accuracy(runner, x: torch.Tensor, y: torch.Tensor) -> float:
    pred = torch.cat([runner(x[i:i + 256]).argmax(1) for i in range(0, len(x), 256)])
    return round(100.0 * (pred == y).float().mean().item(), 2)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run-dir", type=Path, help="a compress run directory (its trained float artifacts)")
    ap.add_argument("--teacher", default="teacher", help="the run's teacher stage (the PyTorch baseline)")
    ap.add_argument("--models", nargs="*", default=None,
                    help=f"registry models NAME:CxHxW, random weights (default {BIG_MODELS}, and without --run-dir "
                         f"also {PIPELINE_MODELS})")
    ap.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--threads", type=int, nargs="+", default=None, help="default: 1 and all usable cores")
    ap.add_argument("--repeats", type=int, default=5, help="interleaved rounds (median of their p50)")
    ap.add_argument("--iters", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--accuracy-images", type=int, default=10000)
    ap.add_argument("--tiny", action="store_true", help="smoke: one small model, batch 1 and 4, few iterations")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    _import_models()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    threads_list = args.threads or sorted({1, cores})
    if args.tiny:
        args.models = args.models if args.models is not None else ["resnet20:1x28x28", "shufflenetv2_x0_5:1x28x28"]
        args.batch_sizes, args.repeats, args.iters, args.warmup = [1, 4], 2, 3, 1
        args.accuracy_images = min(args.accuracy_images, 256)
    models = args.models if args.models is not None else BIG_MODELS + ([] if args.run_dir else PIPELINE_MODELS)

    specs, test = [], None
    if args.run_dir:
        specs, test = _pipeline_models(args.run_dir, args.accuracy_images)
    for item in models:
        name, shape = item.split(":")
        shape = tuple(int(v) for v in shape.split("x"))
        torch.manual_seed(0)
        specs.append({"name": f"{name}@{shape[1]}px", "parent": None, "shape": shape,
                      "module": create_model(name, num_classes=10, in_channels=shape[0]),
                      "calib": torch.randn(64 if args.tiny else 128, *shape)})

    results = []
    with tempfile.TemporaryDirectory(prefix="int8-cpu-") as work:
        built = {s["name"]: _build(s, Path(work)) for s in specs}
        teacher = args.teacher if args.run_dir else "resnet20@28px"
        specs.sort(key=lambda s: s["name"] != teacher)
        teacher_p50: dict[tuple[int, int], float] = {}
        for spec in specs:
            b = built[spec["name"]]
            print(f"{spec['name']}: {b['macs'] / 1e6:.1f} MMACs/image", flush=True)
            for threads in threads_list:
                torch.set_num_threads(threads)
                runners = {(rt, p, k): _runner(rt, k, b, threads) for rt, p, k in ROWS}
                # Decisions against ONNX Runtime FP32 on the same images: a runtime that misreads a file shows here
                # even for random-weight models (which have no accuracy to lose).
                # Thread count changes no decision: scored once per model, with the first thread setting.
                if threads == threads_list[0]:
                    probe = (test["x"][:256] if test is not None and "model_file" in spec
                             else torch.randn(64, *spec["shape"]))
                    ref = runners[("onnxruntime", "fp32", "onnx")](probe).argmax(1)
                    agree = {key: round((r(probe).argmax(1) == ref).float().mean().item(), 4)
                             for key, r in runners.items()}
                    acc = {}
                    if test is not None and "model_file" in spec:
                        for key, r in runners.items():
                            acc[key] = _accuracy(r, test["x"], test["y"])
                for bs in args.batch_sizes:
                    x = torch.randn(bs, *spec["shape"])
                    p50s = {key: [] for key in runners}
                    for _ in range(args.repeats):  # interleaved: each runner once per round
                        for key, r in runners.items():
                            p50s[key].append(measure_latency(r, x, args.warmup, args.iters)["p50"])
                    p50 = {key: statistics.median(v) for key, v in p50s.items()}
                    if spec["name"] == teacher:  # measured first: the baseline of every later model
                        teacher_p50[(bs, threads)] = p50[("torch", "fp32", "model")]
                    base_teacher = teacher_p50.get((bs, threads))
                    for (rt, prec, key), ms in p50.items():
                        fp32 = p50[(rt, "fp32", "onnx" if rt != "torch" else "model")]
                        row = {"model": spec["name"], "macs": b["macs"], "runtime": rt, "precision": prec,
                               "format": FORMAT[key], "file": Path(b["files"][key]).name if b["files"][key] else None,
                               "inference_precision": runners[(rt, prec, key)].inference_precision
                               if rt == "openvino" else None,
                               "batch": bs, "threads": threads, "p50_ms": round(ms, 4),
                               "img_s": round(bs * 1000.0 / ms, 1), "speedup_vs_fp32_same_runtime": round(fp32 / ms, 2),
                               "speedup_vs_ort_fp32": round(p50[("onnxruntime", "fp32", "onnx")] / ms, 2),
                               "speedup_vs_teacher_torch": round(base_teacher / ms, 2) if base_teacher else None,
                               "accuracy": acc.get((rt, prec, key)),
                               "top1_agreement_with_ort_fp32": agree[(rt, prec, key)],
                               "accuracy_fp32_parent": acc.get(("onnxruntime", "fp32", "onnx"))}
                        results.append(row)
                        print(f"  {rt:<11} {FORMAT[key]:<38} b{bs:<3} t{threads} p50 {ms:9.3f} ms "
                              f"{row['img_s']:>10,.0f} img/s  x{row['speedup_vs_fp32_same_runtime']:.2f} vs fp32"
                              + (f"  top-1 {row['accuracy']}" if row["accuracy"] is not None else ""), flush=True)

    m = machine_info()
    info = {"cpu": m["cpu"], "cores": m["cores"], "cores_usable": cores, "isa": fastpath.isa(),
            "versions": m["versions"], "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "int8_cpu.json").write_text(json.dumps({"machine": info, "rows": results}, indent=1))
    (args.out / "int8_cpu.md").write_text(_markdown(info, results))
    print(f"wrote {args.out / 'int8_cpu.json'} and {args.out / 'int8_cpu.md'}")
    return 0


def _markdown(info: dict, rows: list[dict]) -> str:
    lines = ["# INT8 on the CPU: every runtime and format side by side", "",
             f"CPU: {info['cpu']} ({info['cores_usable']} usable cores); instruction sets: "
             f"{', '.join(info['isa']) or 'unknown'}. onnxruntime {info['versions'].get('onnxruntime')}, "
             f"openvino {info['versions'].get('openvino')}, torch {info['versions'].get('torch')}. {info['created']}.",
             "", "p50 is the median over interleaved rounds of each round's p50; speed-ups divide p50s at the same "
             "batch and threads. `vs teacher` is over the teacher (ResNet-20) in PyTorch eager FP32. `agrees with ORT "
             "FP32`: top-1 decisions equal to ONNX Runtime FP32's on the test images (random-weight models: 64 random "
             "inputs); a runtime that misreads a file shows here. Rows whose INT8 form loses accuracy are not "
             "worth their speed.", "",
             "| model | MMACs | runtime | format | batch | threads | p50 ms | img/s | vs FP32 same runtime | "
             "vs ORT FP32 | vs teacher | top-1 % | agrees with ORT FP32 |",
             "|---|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        fmt = r["format"] + (f" (float ops {r['inference_precision']})" if r["inference_precision"] else "")
        lines.append(f"| {r['model']} | {r['macs'] / 1e6:.1f} | {r['runtime']} | {fmt} | {r['batch']} | {r['threads']} | "
                     f"{r['p50_ms']:.3f} | {r['img_s']:,.0f} | {r['speedup_vs_fp32_same_runtime']:.2f}x | "
                     f"{r['speedup_vs_ort_fp32']:.2f}x | "
                     + (f"{r['speedup_vs_teacher_torch']:.2f}x" if r["speedup_vs_teacher_torch"] else "-")
                     + f" | {r['accuracy'] if r['accuracy'] is not None else '-'} | "
                     f"{100 * r['top1_agreement_with_ort_fp32']:.1f}% |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
