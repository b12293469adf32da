#!/usr/bin/env python3
"""Classify images with the model in this bundle: python infer.py IMAGE [IMAGE ...] [--runtime R] [--json]

Needs numpy, Pillow and onnxruntime (or openvino for model.xml; or tensorrt + torch with CUDA for model.plan, run by the
trt_exec.py shipped beside it). The preprocessing is read from manifest.json: the exact steps the
model was trained with.

This file is compress/infer.py, copied into every bundle by `compress deploy`; it imports nothing
from compress (except the TensorRT runner, which a bundle that can use it carries as trt_exec.py).
"""
import argparse
import functools
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image

HERE = Path(__file__).resolve().parent
MODES = {1: "L", 3: "RGB", 4: "RGBA"}


@functools.lru_cache(maxsize=None)
def manifest():
    """The bundle's manifest.json (read when used, so this module also imports outside a bundle)."""
    return json.loads((HERE / "manifest.json").read_text())


def find(name):
    for path in (HERE / name, HERE / "1" / name):  # flat bundle, or a Triton model directory
        if path.is_file():
            return path
    return None


def preprocess(path):
    pre = manifest()["preprocess"]
    c, (h, w) = pre["channels"], pre["size"]
    if c not in MODES:
        sys.exit(f"error: no Pillow mode for {c}-channel images")
    img = Image.open(path).convert(MODES[c])
    bilinear = getattr(Image, "Resampling", Image).BILINEAR
    if pre.get("resize"):  # torchvision's Resize(resize) + CenterCrop(size), as the model was trained and scored
        r = pre["resize"]
        iw, ih = img.size
        size = (r, int(r * ih / iw)) if iw <= ih else (int(r * iw / ih), r)
        img = img.resize(size, bilinear) if img.size != size else img
        left, top = int(round((size[0] - w) / 2.0)), int(round((size[1] - h) / 2.0))
        img = img.crop((left, top, left + w, top + h))
    elif img.size != (w, h):
        img = img.resize((w, h), bilinear)
    x = np.asarray(img, dtype=np.float32).reshape(h, w, c).transpose(2, 0, 1)   # HWC -> CHW
    mean = np.asarray(pre["mean"], dtype=np.float32).reshape(c, 1, 1)
    std = np.asarray(pre["std"], dtype=np.float32).reshape(c, 1, 1)
    return ((x * np.float32(pre["scale"]) - mean) / std)[None].astype(np.float32)  # a batch of one, NCHW


def run_onnxruntime(x):
    import onnxruntime as ort

    model = find("model.onnx")
    wanted = ("CUDAExecutionProvider", "CPUExecutionProvider")
    providers = [p for p in wanted if p in ort.get_available_providers()]
    session = ort.InferenceSession(str(model), providers=providers)
    return session.run(None, {session.get_inputs()[0].name: x})[0], f"onnxruntime ({model.name})"


def run_openvino(x):
    import openvino as ov

    model = find("model.xml")  # FP32 means FP32: no bf16 on CPUs that have it (INT8 layers stay int8)
    compiled = ov.Core().compile_model(str(model), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    return compiled(x)[0], f"openvino {ov.__version__} ({model.name})"


def run_tensorrt(x):
    import torch

    try:  # the runner compress itself uses: shipped beside this file, or from the installed package
        from trt_exec import EngineExec
    except ImportError:
        from compress.trt_exec import EngineExec

    plan = find("model.plan")
    logits = EngineExec(plan.read_bytes(), torch.device("cuda"), name=str(plan))(torch.from_numpy(x))
    torch.cuda.current_stream().synchronize()
    return logits.float().cpu().numpy(), f"tensorrt ({plan.name})"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("images", nargs="+", type=Path)
    ap.add_argument("--runtime", choices=("auto", "tensorrt", "openvino", "onnxruntime"), default="auto",
                    help="auto: TensorRT when model.plan exists and tensorrt imports, OpenVINO for model.xml, "
                         "else ONNX Runtime")
    ap.add_argument("--json", action="store_true", help="one JSON object per image")
    args = ap.parse_args()
    x = np.concatenate([preprocess(p) for p in args.images])
    runtime = args.runtime
    if runtime == "auto":
        runtime = "openvino" if find("model.xml") else "onnxruntime"
        if find("model.plan"):
            try:
                import tensorrt  # noqa: F401
                import torch

                runtime = "tensorrt" if torch.cuda.is_available() else runtime
            except ImportError:
                pass
    try:
        run = {"tensorrt": run_tensorrt, "openvino": run_openvino}.get(runtime, run_onnxruntime)
        logits, used = run(x)
    except Exception as exc:
        if args.runtime != "auto" or runtime == "onnxruntime":
            raise
        print(f"TensorRT failed ({exc}); using ONNX Runtime", file=sys.stderr)
        logits, used = run_onnxruntime(x)
    z = logits - logits.max(axis=1, keepdims=True)
    probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
    names = manifest()["labels"]
    print(f"runtime: {used}", file=sys.stderr)
    for path, p in zip(args.images, probs):
        k = int(p.argmax())
        if args.json:
            print(json.dumps({"image": str(path), "index": k, "class": names[k], "probability": float(p[k]),
                              "runtime": used}))
        else:
            print(f"{path}: " if len(args.images) > 1 else "", end="")
            print(f"{names[k]} {p[k]:.4f}")


if __name__ == "__main__":
    main()
