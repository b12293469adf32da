#!/usr/bin/env python3
"""`make gpu-wheels` and `make gpu-check`: prove every CUDA path in one prepared command.

The GPU machine this project can expect is air-gapped and brief (about 15 minutes, no package
index, at most 64 MiB brought along). Its image holds CUDA PyTorch, torchvision, timm, onnx,
onnxruntime, numpy, pyyaml, rich, typer, matplotlib, pillow and pytest, and nothing else
of ours. So the work is split in two:

    make gpu-wheels GPU_PYTHON=3.12    # here, with a network: wheels of what that image lacks
    make gpu-check                     # there: set up offline, run every GPU test and a short
                                       # GPU pipeline, write one JSON summary, exit 1 on failure

`prepare` walks the dependency closure of the project in the local venv (its installed
versions, the ones the suite passed with), drops what the image provides (its packages and
everything they depend on), and downloads the rest as wheels for the GPU machine's Python,
`--no-deps`, into an ignored folder, with a manifest. Nothing may push the folder over the
budget: the command and the working tree travel in the same 64 MiB.

`run` uses the machine's own Python and PyTorch: a venv with --system-site-packages, the
manifest's wheels that the machine does not already have, the project itself (editable,
built from the prepared setuptools), then the checks. Without a CUDA GPU it says so in one
line and exits 3, so a CPU machine is never mistaken for a passed check.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, Iterable

ROOT = Path(__file__).resolve().parent.parent
EXIT_FAILED, EXIT_BAD_INPUT, EXIT_NO_GPU = 1, 2, 3
MANIFEST = "wheels.json"
BUDGET_MIB = 56  # of the 64 MiB a command may carry; the rest is the working tree (~1.5 MiB)

# What the GPU image already holds (issue 14). Their own dependencies come with them.
# typer is not counted: the image's is older than the project's pin (0.27, typer's own click), and the
# first H200 run failed every check on it; install_plan replaces any machine package the pins refuse.
IMAGE_HAS = ("torch", "torchvision", "timm", "onnx", "onnxruntime", "numpy", "pyyaml", "rich",
             "matplotlib", "pillow", "pytest")
# Image packages whose own dependencies are surely there too (torch without sympy does not import).
# typer, rich, timm and torchvision are not among them: an older typer has no pydantic, say.
IMAGE_TRUSTED = ("torch", "onnx", "onnxruntime", "matplotlib", "pytest", "numpy", "pillow", "pyyaml")
# Declared by a dependency, imported by none of the code we run: not worth their megabytes.
NEVER_IMPORTED = {
    "scikit-learn": "nncf declares it, but no nncf module imports sklearn",
    "joblib": "scikit-learn's", "threadpoolctl": "scikit-learn's", "narwhals": "scikit-learn's",
    "cloudpickle": "scikit-learn's",
}
# The project's own requirements for the check: its dependencies and the test tools.
ROOTS = ("torch-pruning", "onnxscript", "nncf", "pydantic", "pyyaml", "typer", "rich", "matplotlib", "numpy",
         "pillow", "onnx", "onnxruntime", "pytest-timeout", "hypothesis")
# What every check imports; a venv that lacks one fails the set-up in one line, not each check.
NEEDED_MODULES = ("torch", "typer", "pytest", "onnxruntime", "nncf", "torch_pruning", "compress")
BUILD = ("setuptools", "wheel", "packaging")  # to build the editable install offline (isolated)
# A wheel for any Linux x86_64 glibc >= 2.17 Python of the chosen version, or pure Python.
PLATFORMS = ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64", "manylinux_2_28_x86_64")


class CheckError(RuntimeError):
    """A set-up problem the user must fix; one line."""


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def requirement_name(req: str) -> str | None:
    """`scipy>=1.3; python_version<'3.12'` -> 'scipy'; None for an extra-only requirement."""
    if "extra ==" in req.replace('"', "'").replace("extra=='", "extra == '"):
        return None
    m = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9_.-]*)", req)
    return norm(m.group(1)) if m else None


def closure(roots: Iterable[str], requires: Callable[[str], list[str] | None]) -> list[str]:
    """Every distribution reachable from `roots`, depth first, each once (missing ones included)."""
    seen: list[str] = []

    def walk(name: str) -> None:
        if name in seen:
            return
        seen.append(name)
        for req in requires(name) or []:
            dep = requirement_name(req)
            if dep:
                walk(dep)

    for root in roots:
        walk(norm(root))
    return seen


def wanted(roots: Iterable[str], requires: Callable[[str], list[str] | None], image: Iterable[str],
           trusted: Iterable[str] = IMAGE_TRUSTED, never: Iterable[str] = NEVER_IMPORTED) -> list[str]:
    """What the GPU machine needs and its image lacks: the project's closure, minus the image's
    packages and the closure of those whose dependencies can be trusted to be there."""
    provided = {norm(n) for n in image} | set(closure(trusted, requires))
    skip = provided | {norm(n) for n in never}
    out: list[str] = []

    def walk(name: str) -> None:
        if name in skip or name in out:
            return
        out.append(name)
        for req in requires(name) or []:
            dep = requirement_name(req)
            if dep:
                walk(dep)

    for root in roots:
        walk(norm(root))
    return out


def _local_requires(name: str) -> list[str] | None:
    import importlib.metadata as md

    try:
        return md.requires(name) or []
    except md.PackageNotFoundError:
        return None


def _local_version(name: str) -> str | None:
    import importlib.metadata as md

    try:
        return md.version(name)
    except md.PackageNotFoundError:
        return None


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def download_command(pins: list[str], dest: Path, python: str) -> list[str]:
    """pip download for another machine's Python: binary wheels only, no dependency resolution
    (the closure is already explicit, and resolving would pull torch through torch-pruning)."""
    major, minor = python.split(".")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--dest", str(dest),
           "--python-version", f"{major}{minor}", "--implementation", "cp",
           "--abi", f"cp{major}{minor}", "--abi", "abi3", "--abi", "none"]
    for plat in PLATFORMS:
        cmd += ["--platform", plat]
    return cmd + pins


def write_manifest(dest: Path, python: str, pins: list[str], budget_mib: float) -> dict:
    """The manifest of what `dest` holds; CheckError if it is over the budget or a pin has no wheel."""
    wheels = []
    for f in sorted(dest.glob("*.whl")):
        name, version = f.name.split("-")[:2]
        wheels.append({"name": norm(name), "version": version, "file": f.name, "bytes": f.stat().st_size,
                       "sha256": sha256(f)})
    have = {w["name"] for w in wheels}
    missing = [p for p in pins if norm(p.split("==")[0]) not in have]
    if missing:
        raise CheckError(f"no wheel downloaded for {', '.join(missing)}")
    total = sum(w["bytes"] for w in wheels)
    if total > budget_mib * 2**20:
        biggest = sorted(wheels, key=lambda w: -w["bytes"])[:3]
        raise CheckError(f"the wheels take {total / 2**20:.1f} MiB, over the {budget_mib:g} MiB budget (biggest: "
                         + ", ".join(f"{w['file']} {w['bytes'] / 2**20:.1f} MiB" for w in biggest) + ")")
    manifest = {"format": "compress.gpu-wheels/1", "python": python, "created": _now(),
                "total_bytes": total, "wheels": wheels}
    (dest / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return manifest


def prepare(dest: Path, python: str, budget_mib: float = BUDGET_MIB) -> dict:
    if not re.fullmatch(r"3\.\d{1,2}", python):
        raise CheckError(f"--python {python!r}: expected a version such as 3.12")
    names = wanted(ROOTS, _local_requires, IMAGE_HAS)
    unknown = [n for n in names if _local_version(n) is None]
    if unknown:
        raise CheckError(f"not installed here, so no version to pin: {', '.join(unknown)} (run make setup first)")
    pins = [f"{n}=={_local_version(n)}" for n in names]
    pins += [f"{n}=={_local_version(n)}" if _local_version(n) else n for n in BUILD]
    dest.mkdir(parents=True, exist_ok=True)
    for old in dest.glob("*.whl"):
        old.unlink()
    proc = subprocess.run(download_command(pins, dest, python), capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr.strip().splitlines() or ["?"])[-1]
        raise CheckError(f"pip download failed: {tail}")
    return write_manifest(dest, python, pins, budget_mib)


# ----------------------------------------------------------------------------- on the GPU machine

def project_pins(pyproject: Path = ROOT / "pyproject.toml") -> dict[str, str]:
    """The project's own dependency specifiers by name, e.g. {'typer': '>=0.27'} (pip's view of what fits)."""
    import tomllib

    from packaging.requirements import Requirement

    deps = tomllib.loads(pyproject.read_text())["project"]["dependencies"]
    return {norm(r.name): str(r.specifier) for r in map(Requirement, deps)}


def install_plan(manifest: dict, installed: Callable[[str], str | None],
                 pins: dict[str, str] | None = None) -> tuple[list[dict], list[str]]:
    """(wheels to install, names the machine already has): the machine's own packages win where they
    satisfy the project's pins (as pip would leave them); one the pins refuse is replaced by ours."""
    from packaging.specifiers import SpecifierSet
    from packaging.version import InvalidVersion

    pins = pins or {}
    todo, kept = [], []
    for w in manifest["wheels"]:
        if w["name"] in BUILD:
            continue  # only for building the project, from --find-links
        have = installed(w["name"])
        try:
            fits = have is not None and SpecifierSet(pins.get(w["name"], "")).contains(have, prereleases=True)
        except InvalidVersion:
            fits = False
        if fits:
            kept.append(w["name"])
        else:
            todo.append(w)
    return todo, kept


def load_manifest(wheels: Path) -> dict:
    try:
        manifest = json.loads((wheels / MANIFEST).read_text())
    except FileNotFoundError:
        raise CheckError(f"{wheels / MANIFEST}: not found; run `make gpu-wheels` on a networked machine and "
                         f"bring {wheels}/ along") from None
    except (OSError, ValueError) as exc:
        raise CheckError(f"{wheels / MANIFEST}: unreadable ({exc})") from None
    if (not isinstance(manifest, dict) or manifest.get("format") != "compress.gpu-wheels/1"
            or not isinstance(manifest.get("wheels"), list)
            or not all(isinstance(w, dict) and isinstance(w.get("file"), str) and isinstance(w.get("name"), str)
                       and re.fullmatch(r"[\w.+-]+\.whl", w["file"]) for w in manifest["wheels"])):
        raise CheckError(f"{wheels / MANIFEST}: not a gpu-wheels manifest")
    for w in manifest["wheels"]:
        f = wheels / w["file"]  # a plain file name: checked above
        if not f.is_file() or sha256(f) != w["sha256"]:
            raise CheckError(f"{f}: missing or changed since `make gpu-wheels` (sha256 differs)")
    return manifest


def _env_python(venv: Path) -> Path:
    return venv / "bin" / "python"


def inherit_site_packages(venv: Path, parent: list[str] | None = None) -> Path | None:
    """Let `venv` see this interpreter's packages when this interpreter is itself a venv's.

    `--system-site-packages` reaches the *base* Python's site-packages, and the GPU machine's
    `python3` is a venv (/opt/torch/.venv) whose torch lives in its own site-packages: a nested venv
    saw no torch, typer or pytest at all. A .pth file in the new venv appends the parent's folders to
    sys.path after the venv's own, so what the check installs still wins. None if there is no parent.
    """
    import site

    if parent is None:
        if sys.prefix == sys.base_prefix:
            return None
        parent = [p for p in site.getsitepackages() if Path(p).is_dir()]
    if not parent:
        return None
    probe = subprocess.run([str(_env_python(venv)), "-c", "import site; print(site.getsitepackages()[0])"],
                           capture_output=True, text=True, check=True)
    pth = Path(probe.stdout.strip()) / "_compress_parent_venv.pth"
    pth.write_text("".join(f"{p}\n" for p in parent))
    return pth


def setup(wheels: Path, venv: Path, log: Callable[[str], None] = print) -> tuple[Path, dict]:
    """A venv over the machine's own site-packages, the missing wheels, the project. Offline."""
    manifest = load_manifest(wheels)
    mine = f"{sys.version_info.major}.{sys.version_info.minor}"
    if manifest.get("python") != mine:
        log(f"note: the wheels were prepared for Python {manifest.get('python')}, this is {mine}: "
            "binary wheels among them will not install")
    if not _env_python(venv).exists():
        subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True,
                       capture_output=True)
    inherit_site_packages(venv)
    py = str(_env_python(venv))
    have = subprocess.run([py, "-c", "import importlib.metadata as m, json; print(json.dumps("
                           "{d.metadata['Name'].lower().replace('_', '-'): d.version for d in m.distributions()"
                           " if d.metadata['Name']}))"], capture_output=True, text=True, check=True)
    versions = json.loads(have.stdout)
    todo, kept = install_plan(manifest, lambda n: versions.get(n), project_pins())
    offline = ["--no-index", "--find-links", str(wheels), "--disable-pip-version-check", "-q"]
    if todo:
        subprocess.run([py, "-m", "pip", "install", "--no-deps", *offline, *[str(wheels / w["file"]) for w in todo]],
                       check=True)
    subprocess.run([py, "-m", "pip", "install", "--no-deps", *offline, "-e", str(ROOT)], check=True)
    sees = subprocess.run([py, "-c", "import importlib.util as u, sys; print(' '.join(m for m in sys.argv[1:] "
                           "if u.find_spec(m) is None))", *NEEDED_MODULES], capture_output=True, text=True)
    if sees.returncode != 0 or sees.stdout.strip():
        raise CheckError(f"the check's venv ({venv}) cannot import {sees.stdout.strip() or sees.stderr.strip()}: "
                         "it does not see the machine's packages")
    return Path(py), {"installed": [f"{w['name']}=={w['version']}" for w in todo], "kept_from_machine": kept}


def gpu_status() -> tuple[bool, str]:
    """(has a CUDA GPU, one line saying what this machine has)."""
    try:
        import torch
    except ImportError:
        return False, "no PyTorch on this machine's Python"
    if not torch.cuda.is_available():
        return False, f"no CUDA GPU on this machine (torch {torch.__version__}: torch.cuda.is_available() is False)"
    return True, f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}, CUDA {torch.version.cuda}"


def _now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def _check(name: str, cmd: list[str], timeout: float, env: dict, cwd: Path = ROOT) -> dict:
    """Run one check as a subprocess; pass/fail, seconds and the tail of its output."""
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
        rc, out = proc.returncode, proc.stdout + proc.stderr
    except subprocess.TimeoutExpired as exc:
        rc, out = 124, f"timed out after {timeout:.0f} s\n" + ((exc.stdout or b"").decode(errors="replace")
                                                               if isinstance(exc.stdout, bytes) else exc.stdout or "")
    return {"name": name, "command": " ".join(cmd), "passed": rc == 0, "exit_code": rc,
            "seconds": round(time.perf_counter() - t0, 1), "output_tail": out[-3000:]}


def checks(py: Path, work: Path, env: dict) -> list[dict]:
    """The checks, in order. Each is independent and has a time limit; the limits add up to 6 min 30 s
    (the issue's budget is 7 min); the set-up (a venv, a dozen wheels, the project) took 61 s on a
    2-core CPU here."""
    py_s, runs, reports = str(py), work / "runs", work / "reports"
    results = [
        # every test that skips without a GPU (or TensorRT): selected from their skip markers
        _check("gpu tests", [py_s, "-m", "pytest", "-q", "-p", "gpu_tests", "-p", "no:cacheprovider",
                             "--junitxml", str(work / "gpu-tests.xml"), "tests"], 120,
               {**env, "PYTHONPATH": str(ROOT / "scripts")}),
        # teacher (bf16 autocast, channels-last), distilled student, prune, QAT and PTQ INT8,
        # benchmark with torch-CUDA, ONNX Runtime (and TensorRT where installed) rows, report
        _check("gpu pipeline", [py_s, "-m", "compress", "run", "pipelines/gpu-check.yaml", "--out", str(runs),
                                "--reports", str(reports), "--no-progress"], 150, env),
    ]
    report_dir = reports / "gpu-check"
    results.append(_check("deploy", [py_s, "-m", "compress", "deploy", str(report_dir), "--runs", str(runs),
                                     "--artifact", "student-int8", "--target", "onnx", "--out",
                                     str(work / "bundle"), "--force"], 30, env))
    image = work / "image.png"
    make_image = ("from PIL import Image; import numpy as np; "
                  f"Image.fromarray((np.arange(28*28) % 256).astype('uint8').reshape(28, 28)).save({str(image)!r})")
    subprocess.run([py_s, "-c", make_image], env=env, capture_output=True)
    results.append(_check("infer.py", [py_s, str(work / "bundle" / "infer.py"), str(image), "--json"], 30, env))
    # the teacher's training step against a minimal CUDA loop, img/s (synthetic images: the machine
    # has no network and may have no Fashion-MNIST)
    results.append(_check("train speed", [py_s, "benchmarks/train_speed.py", "--models", "resnet20", "--images",
                                          "10000", "--repeats", "1", "--device", "cuda", "--dataset", "synthetic",
                                          "--out", str(work), "--name", "train_speed-gpu-check"], 60, env))
    speed = work / "train_speed-gpu-check.json"
    if speed.is_file():
        results[-1]["result"] = json.loads(speed.read_text())
    rep = report_dir / "report.json"
    if rep.is_file():
        report = json.loads(rep.read_text())
        results[1]["rows"] = [{k: r.get(k) for k in ("name", "runtime", "precision", "device", "status", "accuracy",
                                                     "latency_ms", "reason", "parity")}
                              for r in report.get("artifacts", [])]
        results[1]["flags"] = report.get("flags", [])
    return results


def run(wheels: Path, out: Path, work: Path) -> int:
    ok, what = gpu_status()
    if not ok:
        print(f"gpu-check: {what}; nothing to check (exit {EXIT_NO_GPU})")
        return EXIT_NO_GPU
    t0 = time.perf_counter()
    work.mkdir(parents=True, exist_ok=True)
    summary: dict = {"format": "compress.gpu-check/1", "created": _now(), "gpu": what, "machine": {
        "python": platform.python_version(), "platform": platform.platform()}}
    try:
        py, installed = setup(wheels, work / "venv")
        summary["setup"] = {"passed": True, **installed}
    except (CheckError, subprocess.CalledProcessError, OSError) as exc:
        summary["setup"] = {"passed": False, "error": str(exc)}
        summary["checks"] = []
    else:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        versions = subprocess.run([str(py), "-c", "from compress.runtime import machine_info; import json; "
                                   "print(json.dumps(machine_info()))"], capture_output=True, text=True, env=env)
        if versions.returncode == 0:
            summary["machine"].update(json.loads(versions.stdout))
        summary["checks"] = checks(py, work, env)
    summary["passed"] = summary["setup"]["passed"] and all(c["passed"] for c in summary["checks"])
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(summary, indent=2) + "\n")
    for c in summary["checks"]:
        print(f"{'PASS' if c['passed'] else 'FAIL'}  {c['name']}  ({c['seconds']} s)")
    print(f"gpu-check: {'passed' if summary['passed'] else 'FAILED'}; summary in {out}")
    return 0 if summary["passed"] else EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p = sub.add_parser("prepare", help="download the wheels the GPU image lacks (networked machine)")
    p.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    p.add_argument("--python", default="3.12", help="the GPU machine's Python version (binary wheels)")
    p.add_argument("--budget-mib", type=float, default=BUDGET_MIB)
    r = sub.add_parser("run", help="set up offline and run the checks (GPU machine)")
    r.add_argument("--wheels", type=Path, default=ROOT / ".gpu-wheels")
    r.add_argument("--work", type=Path, default=ROOT / ".gpu-check")
    r.add_argument("--out", type=Path, default=None, help="the JSON summary (default: WORK/gpu-check.json)")
    args = ap.parse_args(argv)
    try:
        if args.command == "prepare":
            m = prepare(args.wheels, args.python, args.budget_mib)
            print(f"gpu-wheels: {len(m['wheels'])} wheels, {m['total_bytes'] / 2**20:.1f} MiB in {args.wheels} "
                  f"(Python {m['python']})")
            return 0
        return run(args.wheels, args.out or args.work / "gpu-check.json", args.work)
    except CheckError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT


if __name__ == "__main__":
    sys.exit(main())
