#!/usr/bin/env python3
"""The zoo's torchvision-layout models against the real torchvision, where torchvision imports.

torchvision does not import next to the CPU torch of the development machines, so the suite checks
the zoo against keys and logits generated from torchvision's sources (tests/test_torchvision_keys.py).
This script is the other half, for a machine where torchvision does import (the GPU machine of
`make gpu-check`): for each architecture it builds torchvision's model with seeded weights and
non-trivial BatchNorm statistics, saves its state_dict as a .pth (what a user brings), loads that
through compress's own `load_weights` into the zoo's model, and compares the two models' logits on
224-px inputs on the CPU and, where there is one, on the GPU (float32, TF32 off). One JSON summary;
exit 1 if any architecture differs, 3 if torchvision does not import.

    python3 scripts/torchvision_check.py --out tv-check.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

# The same architectures the suite checks against torchvision's sources: one list, its committed files.
ARCHS = tuple(sorted(p.stem for p in (ROOT / "tests" / "data" / "torchvision_keys").glob("*.json")))
ATOL = 1e-4  # on logits of unit scale; relative to their largest magnitude


def perturb_batchnorm(model: torch.nn.Module, seed: int) -> None:
    """Running statistics and affine terms away from their (0, 1) defaults, so BN mismatches show."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.weight.data.copy_(torch.rand(n, generator=g) * 0.5 + 0.75)
            m.bias.data.copy_(torch.randn(n, generator=g) * 0.1)


def compare(arch: str, devices: list[str], tmp: Path) -> dict:
    import torchvision

    from compress.registry import count_macs, create_model
    from compress.weights import load_weights

    torch.manual_seed(0)
    theirs = torchvision.models.get_model(arch, weights=None, num_classes=1000).eval()
    perturb_batchnorm(theirs, 1)
    pth = tmp / f"{arch}.pth"
    torch.save(theirs.state_dict(), pth)
    ours = create_model(arch, num_classes=1000, in_channels=3).eval()
    loaded = load_weights(ours, pth, num_classes=1000, model_name=arch)
    x = torch.randn(4, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    out: dict = {"arch": arch, "weights_format": loaded["weights_format"],
                 "params": sum(p.numel() for p in ours.parameters()),
                 "params_torchvision": sum(p.numel() for p in theirs.parameters()),
                 "macs_224": count_macs(ours, (3, 224, 224)), "devices": {}}
    ok = out["params"] == out["params_torchvision"]
    for dev in devices:
        a, b = theirs.to(dev), ours.to(dev)
        with torch.no_grad():
            ya, yb = a(x.to(dev)).float().cpu(), b(x.to(dev)).float().cpu()
        scale = float(ya.abs().max())
        diff = float((ya - yb).abs().max())
        same_top1 = bool((ya.argmax(1) == yb.argmax(1)).all())
        passed = diff <= ATOL * max(1.0, scale) and same_top1
        out["devices"][dev] = {"max_abs_diff": diff, "logit_scale": scale, "same_top1": same_top1, "passed": passed}
        ok = ok and passed
    out["passed"] = ok
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("torchvision-check.json"))
    ap.add_argument("--archs", default=",".join(ARCHS), help="comma-separated torchvision names")
    args = ap.parse_args(argv)
    archs = [a for a in args.archs.split(",") if a]
    unknown = [a for a in archs if a not in ARCHS]
    if unknown:
        print(f"error: --archs: unknown {', '.join(unknown)} (known: {', '.join(ARCHS)})", file=sys.stderr)
        return 2
    try:
        import torchvision
    except Exception as exc:  # noqa: BLE001 - any import failure means the same: nothing to compare against
        print(f"torchvision-check: torchvision does not import here ({type(exc).__name__}: {exc}); exit 3")
        return 3
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    t0 = time.perf_counter()
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for arch in archs:
            try:
                r = compare(arch, devices, Path(tmp))
            except Exception as exc:  # noqa: BLE001 - one architecture's failure is a result, not a crash
                r = {"arch": arch, "passed": False, "error": f"{type(exc).__name__}: {exc}"}
            results.append(r)
            detail = r.get("error") or "  ".join(f"{d}: max|diff| {v['max_abs_diff']:.2e}"
                                                 for d, v in r["devices"].items())
            print(f"{'PASS' if r['passed'] else 'FAIL'}  {arch:<20} {detail}", flush=True)
    summary = {"format": "compress.torchvision-check/1", "torch": torch.__version__,
               "torchvision": torchvision.__version__,
               "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
               "atol_relative": ATOL, "seconds": round(time.perf_counter() - t0, 1), "results": results,
               "passed": all(r["passed"] for r in results)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"torchvision-check: {'passed' if summary['passed'] else 'FAILED'}; summary in {args.out}")
    return 0 if summary["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
