"""`compress deploy`: one artifact of a run, bundled for where it will serve.

A bundle is the model, a `manifest.json` that makes it usable without this package (the
preprocessing the model was trained with, the class names, versions, the source artifact and
the sha256 of every shipped file) and an `infer.py` that classifies one image with nothing but
numpy, Pillow and ONNX Runtime (or TensorRT, when an engine is there and it imports).

    onnx    model.onnx, manifest.json, infer.py, labels.txt
    triton  a model repository: <name>/config.pbtxt, <name>/1/model.onnx (platform
            onnxruntime_onnx), or model.plan (tensorrt_plan) when a TensorRT engine built for
            this GPU and TensorRT version exists; labels.txt, manifest.json, infer.py beside it.
            --out may be an existing repository: <name>/ is added, other models stay, and only
            a model of the same name is replaced (--force). A plan ships with engine.json (the
            TensorRT version and GPU it needs) and rebuild_engine.sh, which rebuilds it from the
            ONNX inside the Triton container when those differ
    jetson  model.onnx (FP32, or the INT8 Q/DQ model), model_fp16.onnx for FP16, and
            build_engine.sh: trtexec --stronglyTyped, the way TensorRT 10 (JetPack 6) builds an
            engine whose precision the ONNX decides (see compress/trt.py)

An engine only runs on the GPU model and TensorRT version it was built with, so one is shipped
only when its sidecar manifest matches the machine running `deploy`; otherwise the bundle
says so, and the Jetson bundle builds its own on the device.

The bundle is assembled in a temp directory beside --out and renamed into place, so --out is
either the previous bundle or the complete new one, never half of each.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import compress
from compress import rundir
from compress.io import sha256_file
from compress.onnx_export import INPUT_NAME, OUTPUT_NAME  # the exported graph's tensor names

TARGETS = ("triton", "jetson", "onnx", "openvino")
PRECISIONS = ("fp32", "fp16", "int8")
FORMAT = "compress.deploy/1"


class DeployError(ValueError):
    """A bundle that cannot be made as asked; one line for the user."""


# ----------------------------------------------------------------------------- finding the artifact

def _read_json(path: Path) -> dict:
    from compress.io import FileReadError, read_regular_file

    try:
        return json.loads(read_regular_file(path, 64 << 20, "JSON file"))
    except FileReadError as exc:
        raise DeployError(str(exc)) from None
    except (OSError, ValueError, RecursionError) as exc:
        first = (str(exc).splitlines() or [""])[0][:120]
        raise DeployError(f"{path}: unreadable ({type(exc).__name__}: {first})") from None


def _checked_report(report, file: Path) -> dict:
    """The report, checked against the schema of the fields compress reads (compress.compare)."""
    from compress.compare import CompareError, check_report

    try:
        check_report(report, file)
    except CompareError as exc:
        raise DeployError(str(exc)) from None
    report["_path"] = str(file)
    return report


def _checked_preprocess(pre: dict, where: str) -> dict:
    """The preprocessing a bundle's infer.py will apply; DeployError when a field has the wrong type."""
    def numbers(v, n):
        return isinstance(v, list) and len(v) == n and all(type(x) in (int, float) and math.isfinite(x) for x in v)

    c = pre.get("channels")
    problems = [("channels", type(c) is int and 1 <= c <= 64),
                ("size", isinstance(pre.get("size"), list) and len(pre["size"]) == 2
                 and all(type(x) is int and 1 <= x <= 4096 for x in pre["size"])),
                ("scale", type(pre.get("scale")) in (int, float) and math.isfinite(pre["scale"])),
                ("mean", type(c) is int and numbers(pre.get("mean"), c)),
                ("std", type(c) is int and numbers(pre.get("std"), c) and all(x != 0 for x in pre["std"])),
                ("class_names", isinstance(pre.get("class_names", []), list)
                 and all(isinstance(x, str) and "\n" not in x for x in pre.get("class_names", [])))]
    bad = [name for name, ok in problems if not ok]
    if bad:
        raise DeployError(f"{where}: preprocess.{bad[0]} is missing or has the wrong type; re-run the pipeline "
                          f"that wrote it")
    return pre


def _check_replaceable(out: Path, limit: int = 10_000) -> None:
    """--force replaces a previous bundle or a directory of the user's, never one holding a run or a report
    (whichever report or run this deploy happens to know about): a stage manifest or a report.json anywhere
    inside, or more than `limit` entries, and --out is refused."""
    seen = 0
    for top, dirs, files in os.walk(out):
        seen += len(dirs) + len(files)
        for name in ("manifest.json", "report.json"):
            if name in files:
                head = _peek_json(Path(top, name))
                if not (isinstance(head, dict) and head.get("format") == FORMAT):
                    raise DeployError(f"--out {out} holds {Path(top, name)}, a compress run or report (or an unknown "
                                      f"file of that name); --force never replaces one")
        if seen > limit:
            raise DeployError(f"--out {out} holds more than {limit} files; --force replaces bundles, not trees "
                              f"of that size")


def _peek_json(path: Path):
    """The JSON in `path`, or None when it is not a small regular file of JSON (never blocks on a FIFO)."""
    from compress.io import FileReadError, read_regular_file

    try:
        return json.loads(read_regular_file(path, 4 << 20, "JSON file"))
    except (OSError, ValueError, RecursionError, FileReadError):
        return None


def _is_run_dir(path: Path) -> bool:
    """Has a stage directory with a manifest.json (a bundle's own manifest does not count)."""
    if not path.is_dir():
        return False
    for manifest in path.glob("*/manifest.json"):
        head = _peek_json(manifest)
        if not (isinstance(head, dict) and head.get("format") == FORMAT):
            return True
    return False


def locate(source: Path, runs: Path | None = None, reports: Path = Path("reports")) -> tuple[Path, dict | None]:
    """(run directory, report or None) from a run directory, a report directory or a report.json.

    A report names its run directory (`run_dir`, reports since deploy exists) or, failing that,
    `<runs>/<pipeline name>`. A run directory's report is looked up in `<reports>/<run name>/`.
    """
    source = Path(source)
    if _is_run_dir(source):
        candidate = Path(reports) / source.name / "report.json"
        report = _checked_report(_read_json(candidate), candidate) if candidate.is_file() else None
        return source, report
    file = source / "report.json" if source.is_dir() else source
    if not file.is_file():
        raise DeployError(f"{source}: neither a run directory (runs/<name>/ with stage manifests) nor a report "
                          f"(report.json or its directory)")
    report = _checked_report(_read_json(file), file)
    name = report["pipeline"]["name"]
    tried = []
    if runs is not None:
        tried.append(Path(runs) / name)
    else:
        if report.get("run_dir"):
            tried.append(Path(report["run_dir"]))
        tried.append(Path("runs") / name)
    for run_dir in tried:
        if _is_run_dir(run_dir):
            return run_dir, report
    raise DeployError(f"{file}: its run directory is not here (tried {', '.join(map(str, tried))}); "
                      f"pass --runs DIR, the directory holding {name}/")


def _cut(text: str, limit: int = 80) -> str:
    text = str(text)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def _stage_manifest(run_dir: Path, artifact: str) -> rundir.StageManifest:
    # The artifact is looked up among the run directory's own entries, never joined onto it as a path:
    # '../../elsewhere/stage' or an absolute path cannot name anything but a stage of this run.
    names = rundir.stage_names(run_dir)
    if artifact not in names:
        raise DeployError(f"no artifact {_cut(artifact)!r} in {run_dir} (artifacts: {', '.join(names) or 'none'})")
    try:
        return rundir.read_stage(run_dir / artifact)
    except rundir.StageUnfinished:
        raise DeployError(f"{rundir.manifest_path(run_dir / artifact)}: stage {artifact!r} did not finish; "
                          f"re-run the pipeline") from None
    except rundir.NoManifest as exc:
        raise DeployError(str(exc)) from None
    except rundir.RunDirError as exc:
        raise DeployError(f"{exc}; re-run the stage with --force {artifact}") from None


def _within(path: Path, root: Path) -> bool:
    """Is `path` (after resolving links and '..') `root` or under it?"""
    path, root = Path(path).resolve(), Path(root).resolve()
    return path == root or root in path.parents


def _check_out(out: Path, sources: dict[str, Path]) -> None:
    """--out must be none of the sources, nor inside one, nor above one (replacing it would delete the source)."""
    pairs = list(sources.items())
    for parent in Path(out).resolve().parents:  # also a run or report this deploy was not pointed at
        if (parent / "report.json").is_file():
            pairs.append(("report directory", parent))
        elif _is_run_dir(parent):
            pairs.append(("run directory", parent))
    for what, src in pairs:
        if _within(out, src) or _within(src, out):
            where = "is" if Path(out).resolve() == Path(src).resolve() else \
                "is inside" if _within(out, src) else "contains"
            raise DeployError(f"--out {out} {where} the {what} {src}; bundle somewhere else (--force never "
                              f"replaces a source)")


def _resolve(run_dir: Path, artifact: str, key: str, value: str, manifest: rundir.StageManifest) -> Path:
    """An artifact file as recorded (absolute, or relative to where the pipeline ran), else next to the
    manifest; refused when its bytes are not the ones the stage wrote."""
    path = Path(value)
    if not path.is_file():
        path = run_dir / artifact / path.name
    if not path.is_file():
        raise DeployError(f"{artifact}: its {key} file {value} is gone; re-run the pipeline")
    expected = manifest.outputs.get(key)
    if expected and sha256_file(path) != expected:
        raise DeployError(f"{path} changed since stage {artifact!r} wrote it (sha256 differs from its manifest); "
                          f"re-run the pipeline")
    return path


def _preprocess(report: dict | None, manifest: rundir.StageManifest) -> tuple[dict, str]:
    """(preprocess dict with class_names, where it came from)."""
    for where, holder in (("report.json data", (report or {}).get("data")), ("stage manifest", manifest.data)):
        if isinstance(holder, dict) and isinstance(holder.get("preprocess"), dict):
            return _checked_preprocess(holder["preprocess"], where), where
    if report is None:
        raise DeployError("cannot tell this artifact's preprocessing: the run directory has no report next to it "
                          "(pass the report directory, or --reports DIR)")
    # Reports from before `data` was written: rebuild the dataset from the saved config.
    from compress.config import PipelineConfig
    from compress.data import DataError, build_data

    try:
        cfg = PipelineConfig.model_validate(report["pipeline"]["config"])
        return build_data(cfg.data, "cpu", cfg.seed).preprocess, "dataset rebuilt from the report's config"
    except (DataError, ValueError, KeyError) as exc:
        raise DeployError(f"cannot rebuild the dataset to read its preprocessing: {str(exc).splitlines()[0]}") from None


# ----------------------------------------------------------------------------- engines

def engine_status(plan: Path) -> tuple[bool, str]:
    """Can this machine run this engine? (ok, reason): compress.trt.check_engine (tests replace this name)."""
    from compress.trt import check_engine

    return check_engine(plan)


def _engine(run_dir: Path, artifact: str, manifest: rundir.StageManifest, precisions: list[str],
            report: dict | None) -> tuple[Path | None, str | None, str]:
    """(engine path, its precision, note) for the first of `precisions` with an engine this machine runs."""
    if not precisions:
        return None, None, "none: this target ships ONNX only"
    why = {r["precision"]: r.get("reason") for r in (report or {}).get("artifacts", [])
           if r.get("name") == artifact and r.get("runtime") == "tensorrt" and r.get("status") != "ok"}
    notes = []
    for p in precisions:
        plan = manifest.engine_file(run_dir, p)
        if not plan.is_file():
            record = manifest.engines.get(p)
            reason = record.reason if record is not None and record.reason else why.get(p)
            notes.append(f"no {p} engine was built" + (f" ({reason})" if reason else ""))
            continue
        ok, reason = engine_status(plan)
        if ok:
            return plan, p, f"TensorRT {p} engine {reason}"
        notes.append(reason)
    return None, None, "none shipped: " + "; ".join(notes)


# ----------------------------------------------------------------------------- bundle files

def config_pbtxt(name: str, *, platform: str, max_batch: int, chw: list[int], num_classes: int) -> str:
    """Triton model configuration (protobuf text format of inference.ModelConfig)."""
    dims = ", ".join(str(d) for d in chw)
    return f"""name: "{name}"
platform: "{platform}"
max_batch_size: {max_batch}
input [
  {{
    name: "{INPUT_NAME}"
    data_type: TYPE_FP32
    format: FORMAT_NCHW
    dims: [ {dims} ]
  }}
]
output [
  {{
    name: "{OUTPUT_NAME}"
    data_type: TYPE_FP32
    dims: [ {num_classes} ]
    label_filename: "labels.txt"
  }}
]
dynamic_batching {{ }}
"""


# Find trtexec and check it builds strongly typed networks (TensorRT 10+). The whole help text is
# read first, then searched: `--help | grep -q` under pipefail fails at random when grep exits at
# the first match and trtexec, still writing, dies of SIGPIPE.
_TRTEXEC_CHECK = """TRTEXEC="${TRTEXEC:-$(command -v trtexec || echo /usr/src/tensorrt/bin/trtexec)}"
if ! command -v "$TRTEXEC" >/dev/null 2>&1; then
  echo "error: trtexec not found ($TRTEXEC): install TensorRT 10+ (JetPack 6) or set TRTEXEC=/path/to/trtexec" >&2
  exit 1
fi
HELP_TEXT="$("$TRTEXEC" --help 2>&1 || true)"
case "$HELP_TEXT" in
  *--stronglyTyped*) ;;
  *) echo "error: $TRTEXEC has no --stronglyTyped (TensorRT < 10?); JetPack 6 / TensorRT 10+ is needed" >&2
     exit 1 ;;
esac
"""


def build_engine_sh(onnx_name: str, precision: str, chw: list[int], engine_cfg: dict) -> str:
    shape = "x".join(str(d) for d in chw)
    lo, opt, hi = engine_cfg["min_batch"], engine_cfg["opt_batch"], engine_cfg["max_batch"]
    return f"""#!/usr/bin/env bash
# Build model.plan ({precision}) for THIS device: an engine runs only on the GPU and TensorRT version that
# built it. Strongly typed: the precision is the ONNX's own ({onnx_name}), so no --fp16/--int8 flags.
# Needs TensorRT 10 or newer (JetPack 6); set TRTEXEC to use another trtexec. Extra arguments go to trtexec.
set -euo pipefail
cd "$(dirname "$0")"
{_TRTEXEC_CHECK}"$TRTEXEC" --onnx={onnx_name} --saveEngine=model.plan --stronglyTyped \\
  --minShapes={INPUT_NAME}:{lo}x{shape} --optShapes={INPUT_NAME}:{opt}x{shape} \\
  --maxShapes={INPUT_NAME}:{hi}x{shape} "$@"
echo "built model.plan; try: python3 infer.py IMAGE"
"""


def triton_rebuild_sh(name: str, onnx_name: str, precision: str, chw: list[int], engine_cfg: dict) -> str:
    """<model>/rebuild_engine.sh: a plan runs only under the TensorRT (and GPU) that built it, so inside
    the Triton container this rebuilds 1/model.plan from the ONNX when engine.json names another."""
    shape = "x".join(str(d) for d in chw)
    lo, opt, hi = engine_cfg["min_batch"], engine_cfg["opt_batch"], engine_cfg["max_batch"]
    return rf"""#!/usr/bin/env bash
# Rebuild 1/model.plan ({precision}, strongly typed from {onnx_name}) for the TensorRT and GPU of the
# Triton container this runs in, when they differ from the ones in engine.json. For example:
#   docker run --gpus all --rm -v "$PWD/model_repository:/models" nvcr.io/nvidia/tritonserver:<yy.mm>-py3 \
#       /models/{name}/rebuild_engine.sh
# --force rebuilds anyway; set TRTEXEC to use another trtexec, TRT_VERSION to state the container's.
# manifest.json keeps the sha256 of the plan that was shipped, not of a rebuilt one.
set -euo pipefail
cd "$(dirname "$0")"
FORCE=0
if [ "${{1:-}}" = "--force" ]; then FORCE=1; shift; fi
WANT="$(sed -n 's/.*"tensorrt": *"\([^"]*\)".*/\1/p' engine.json | head -n 1)"
WANT_GPU="$(sed -n 's/.*"gpu": *"\([^"]*\)".*/\1/p' engine.json | head -n 1)"
HAVE="${{TRT_VERSION:-$(ls /usr/lib/*/libnvinfer.so.* /usr/local/tensorrt/lib/libnvinfer.so.* 2>/dev/null \
  | sed -n 's/.*libnvinfer[.]so[.]\([0-9][0-9.]*\)$/\1/p' | sort -V | tail -n 1 || true)}}"
HAVE_GPU="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1 || true)"
case "$WANT" in "$HAVE"|"$HAVE".*) SAME_TRT=1 ;; *) SAME_TRT=0 ;; esac
if [ "$FORCE" = 0 ] && [ -n "$HAVE" ] && [ "$SAME_TRT" = 1 ] && [ "$WANT_GPU" = "$HAVE_GPU" ] && [ -f 1/model.plan ]; then
  echo "1/model.plan was built with TensorRT $WANT on $WANT_GPU, as here: nothing to do (--force rebuilds)"
  exit 0
fi
echo "rebuilding 1/model.plan: built with TensorRT ${{WANT:-?}} on ${{WANT_GPU:-?}}, here TensorRT ${{HAVE:-?}} on ${{HAVE_GPU:-?}}"
{_TRTEXEC_CHECK}"$TRTEXEC" --onnx={onnx_name} --saveEngine=1/model.plan.tmp --stronglyTyped \
  --minShapes={INPUT_NAME}:{lo}x{shape} --optShapes={INPUT_NAME}:{opt}x{shape} \
  --maxShapes={INPUT_NAME}:{hi}x{shape} "$@"
mv -f 1/model.plan.tmp 1/model.plan
printf '{{\n  "tensorrt": "%s",\n  "gpu": "%s",\n  "precision": "{precision}",\n  "built_from": "{onnx_name}",\n  "rebuilt_by": "rebuild_engine.sh"\n}}\n' \
  "${{HAVE:-unknown}}" "${{HAVE_GPU:-unknown}}" > engine.json
echo "built 1/model.plan for TensorRT ${{HAVE:-?}}; (re)load model '{name}' in Triton"
"""


def _place_model(model: Path, repo: Path, name: str, force: bool) -> None:
    """Add one model directory to a Triton model repository, leaving every other model alone; with
    --force an existing model of the same name is replaced (moved aside first, then deleted)."""
    repo.mkdir(parents=True, exist_ok=True)
    dest = repo / name
    if dest.exists() or dest.is_symlink():
        if not force:
            raise DeployError(f"--out {repo} already has a model {name!r}; pass --force to replace it "
                              "(the other models stay)")
        old = Path(tempfile.mkdtemp(prefix=f".{name}.old-", dir=repo.parent))
        os.replace(dest, old / name)
        try:
            os.replace(model, dest)
        except BaseException:
            os.replace(old / name, dest)
            raise
        shutil.rmtree(old, ignore_errors=True)
        return
    os.replace(model, dest)


# The bundle's program: a real module (linted, imported by the tests), copied into every bundle; a
# bundle that may run a TensorRT plan also gets the runner it uses (compress/trt_exec.py).
INFER_PY = Path(__file__).with_name("infer.py")
TRT_EXEC_PY = Path(__file__).with_name("trt_exec.py")


def _readme(target: str, name: str, m: dict, engine_note: str, precision: str) -> str:
    pre = m["preprocess"]
    lines = [f"{name}: {m['artifact']['model']} ({m['artifact']['stage']} stage), {precision}, "
             f"bundled by compress {compress.__version__} for {target}.", "",
             f"Input  '{INPUT_NAME}': float32 NCHW [N, {pre['channels']}, {pre['size'][0]}, {pre['size'][1]}], "
             f"x = (pixel * {pre['scale']:.6g} - mean[c]) / std[c],",
             f"       mean {[round(v, 6) for v in pre['mean']]}, std {[round(v, 6) for v in pre['std']]}.",
             f"Output '{OUTPUT_NAME}': float32 [N, {len(m['labels'])}] logits over labels.txt (softmax for "
             f"probabilities).", "",
             f"TensorRT engine: {engine_note}.", "",
             "Try it:  python3 infer.py IMAGE.png      (numpy, Pillow, "
             + ("openvino: model.xml/.bin, the OpenVINO IR of model.onnx)" if target == "openvino" else "onnxruntime)")]
    if target == "triton":
        lines += ["", "Serve:   tritonserver --model-repository=<the directory holding this one>",
                  f"         the model is '{name}'; infer.py here runs the same model locally."]
    if target == "jetson":
        lines += ["", "On the Jetson (JetPack 6, TensorRT 10):",
                  "  ./build_engine.sh          # writes model.plan for this device",
                  "  python3 infer.py IMAGE.png # uses model.plan when tensorrt and torch (CUDA) import"]
    lines += ["", "manifest.json has the preprocessing, labels, versions, the source artifact and the sha256",
              "of every file here.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- deploy

def _place(tmp: Path, out: Path, force: bool) -> None:
    """Rename the finished bundle onto `out`; a replaced bundle is moved aside first, then deleted."""
    if out.exists():
        if not out.is_dir():
            raise DeployError(f"--out {out} exists and is not a directory")
        if any(out.iterdir()):
            if not force:
                raise DeployError(f"--out {out} is not empty; pass --force to replace it")
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.replace(out, old / out.name)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
            return
        out.rmdir()
    os.replace(tmp, out)


def _openvino_ir(onnx_path: Path, xml: Path) -> list[Path]:
    """The ONNX as OpenVINO IR (model.xml + model.bin), weights kept in their precision (no FP16 compression)."""
    try:
        import openvino as ov
    except ImportError:
        raise DeployError("--target openvino needs the 'openvino' package, which is not installed; install it "
                          "with pip install 'compress-vision[openvino]' (in this checkout: pip install -e '.[openvino]')"
                          ) from None
    ov.save_model(ov.convert_model(str(onnx_path)), str(xml), compress_to_fp16=False)
    return [xml, xml.with_suffix(".bin")]


def _measured_with(target: str, report: dict | None, engine: bool) -> dict:
    """The runtime the bundle runs on and the version of it the report's numbers were measured with."""
    runtime = {"openvino": "openvino", "onnx": "onnxruntime"}.get(target, "tensorrt" if engine else "onnxruntime")
    versions = ((report or {}).get("machine") or {}).get("versions") or {}
    return {"runtime": runtime, "version": versions.get(runtime), "cpu": ((report or {}).get("machine") or {}).get("cpu"),
            "note": None if versions.get(runtime) else "no report measured this runtime"}


def deploy(source: Path, artifact: str, target: str, out: Path, *, precision: str | None = None,
           runs: Path | None = None, reports: Path = Path("reports"), force: bool = False,
           log: Callable[[str], None] = print) -> Path:
    """Bundle `artifact` of the run at `source` for `target` into `out`; return `out`.

    source     a run directory (runs/<name>), a report directory or a report.json
    precision  what to deploy: int8 for a quantize stage (the only choice there); for a float
               model fp32 (onnx, triton default), or fp16 (jetson default; triton only with an
               FP16 engine built for this GPU)
    runs       where a report's run directory is (default: the report's run_dir, else runs/)
    reports    where a run directory's report is (reports/<run name>/)
    """
    if target not in TARGETS:
        raise DeployError(f"--target {target!r}: expected one of {', '.join(TARGETS)}")
    if precision is not None and precision not in PRECISIONS:
        raise DeployError(f"--precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    out = Path(out)
    run_dir, report = locate(source, runs, reports)
    # First: the artifact must be a stage of this run (a plain directory name), before it is part of any path.
    manifest = _stage_manifest(run_dir, artifact)
    sources = {"run directory": run_dir}
    if report is not None:
        sources["report directory"] = Path(report["_path"]).parent
    _check_out(out, sources)
    if _within(Path.cwd(), out):
        raise DeployError(f"--out {out} is the working directory or above it; bundle into a directory of its own")
    if out.exists() and not out.is_dir() or any(p.is_file() and not p.is_dir() for p in out.parents):
        raise DeployError(f"--out {out}: {'it' if out.exists() else 'a parent'} exists and is not a directory")
    if target == "triton":
        # --out is a model repository: <artifact>/ is added, the other models stay; only a model of
        # the same name is replaced, and only with --force
        model_home = out / artifact
        if model_home.exists() or model_home.is_symlink():
            _check_replaceable(model_home)
            if not force:
                raise DeployError(f"--out {out} already has a model {artifact!r}; pass --force to replace it "
                                  "(the other models stay)")
    elif out.exists() and any(out.iterdir()):
        _check_replaceable(out)
        if not force:
            raise DeployError(f"--out {out} is not empty; pass --force to replace it")
    art = manifest.artifact
    native = "int8" if art.precision == "int8" else "fp32"
    if native == "int8" and precision not in (None, "int8"):
        raise DeployError(f"{artifact} is an INT8 (quantize) artifact; it deploys as int8 only")
    if native == "fp32" and precision == "int8":
        raise DeployError(f"{artifact} is a float model; INT8 needs a quantize stage (deploy that stage instead)")
    if target == "onnx" and precision == "fp16":
        raise DeployError("the onnx bundle ships the FP32 or INT8 ONNX; FP16 is built by TensorRT "
                          "(--target jetson, or triton with an FP16 engine)")
    onnx_key = "onnx_int8" if native == "int8" else "onnx"
    if native == "int8" and target in ("onnx", "openvino") and "onnx_int8_cpu" in art.files:
        onnx_key = "onnx_int8_cpu"  # the CPU form (compress.quant.cpu_int8): what CPU runtimes fuse and read right
    if onnx_key not in art.files:
        raise DeployError(f"{artifact} has no {onnx_key} file (it has {', '.join(sorted(art.files))})")
    onnx_path = _resolve(run_dir, artifact, onnx_key, art.files[onnx_key], manifest)
    pre, pre_source = _preprocess(report, manifest)
    labels = list(pre.get("class_names") or [])
    chw = [int(pre["channels"]), *map(int, pre["size"])]
    from compress.config import EngineConfig

    engine_cfg = {k: EngineConfig.model_fields[k].default for k in ("min_batch", "opt_batch", "max_batch")}
    configured = ((report or {}).get("pipeline", {}).get("config", {}).get("engine") or {})
    engine_cfg.update({k: v for k, v in (configured.items() if isinstance(configured, dict) else ())
                       if k in engine_cfg and type(v) is int and 1 <= v <= 1 << 20})

    if target == "jetson":
        deployed = precision or ("int8" if native == "int8" else "fp16")
        engine_precisions = [deployed]
    elif target == "triton":
        deployed = precision or native
        engine_precisions = [precision] if precision else (["int8"] if native == "int8" else ["fp16", "fp32"])
    else:
        deployed, engine_precisions = native, []
    plan, plan_precision, engine_note = _engine(run_dir, artifact, manifest, engine_precisions, report)
    if target == "triton" and deployed == "fp16" and plan is None:
        raise DeployError(f"--precision fp16 on triton needs an FP16 TensorRT engine this machine can run; "
                          f"{engine_note}")
    if plan is not None:
        deployed = plan_precision
    log(f"deploy {artifact} ({deployed}) for {target}; TensorRT engine: {engine_note}")

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o755)  # mkdtemp makes it private; a bundle is read by servers running as other users
    try:
        def inside(dst: Path) -> Path:  # every write is checked to land in the temp bundle, whatever the names
            if not _within(dst, tmp):
                raise DeployError(f"refusing to write {dst}: outside the bundle")
            return dst

        home = tmp / artifact if target == "triton" else tmp
        model_dir = home / "1" if target == "triton" else home
        inside(model_dir).mkdir(parents=True, exist_ok=True)
        shipped: dict[str, str] = {}

        def ship(src: Path, dst: Path) -> None:
            shutil.copyfile(src, inside(dst))
            shipped[str(dst.relative_to(home))] = sha256_file(dst)

        def write(dst: Path, text: str, executable: bool = False) -> None:
            inside(dst).write_text(text)
            if executable:
                dst.chmod(0o755)
            shipped[str(dst.relative_to(home))] = sha256_file(dst)

        if target == "openvino":
            ship(onnx_path, model_dir / "model.onnx")  # kept: the IR's source, and ONNX Runtime's fallback
            for ir in _openvino_ir(onnx_path, model_dir / "model.xml"):
                shipped[str(ir.relative_to(home))] = sha256_file(inside(ir))
        else:
            ship(onnx_path, model_dir / "model.onnx")
        if plan is not None:
            ship(plan, model_dir / "model.plan")
        if target == "jetson" and deployed == "fp16":
            from compress.trt import fp16_onnx

            try:
                fp16 = fp16_onnx(onnx_path, inside(model_dir / "model_fp16.onnx"))
            except ValueError as exc:
                raise DeployError(f"cannot make the FP16 ONNX: {exc}") from None
            shipped[str(fp16.relative_to(home))] = sha256_file(fp16)
        write(home / "labels.txt", "\n".join(labels) + "\n")
        if target == "triton":
            write(home / "config.pbtxt", config_pbtxt(
                artifact, platform="tensorrt_plan" if plan is not None else "onnxruntime_onnx",
                max_batch=int(engine_cfg["max_batch"]), chw=chw, num_classes=len(labels)))
        if target == "triton" and plan is not None:
            # a plan runs only under the TensorRT that built it: record which, next to it, and ship
            # the way to rebuild it from the ONNX in the Triton container when that differs
            from compress.trt import manifest_path

            built = _read_json(manifest_path(plan))
            if not built.get("tensorrt"):
                raise DeployError(f"{plan}: its manifest records no TensorRT version; rebuild the engine")
            rebuild_from = "1/model.onnx"
            if plan_precision == "fp16":
                from compress.trt import fp16_onnx

                try:
                    fp16 = fp16_onnx(onnx_path, inside(home / "model_fp16.onnx"))
                except ValueError as exc:
                    raise DeployError(f"cannot make the FP16 ONNX: {exc}") from None
                shipped[str(fp16.relative_to(home))] = sha256_file(fp16)
                rebuild_from = "model_fp16.onnx"
            write(home / "engine.json", json.dumps({
                "tensorrt": built["tensorrt"], "gpu": built.get("gpu"),
                "compute_capability": built.get("compute_capability"), "cuda": built.get("cuda"),
                "precision": plan_precision, "plan": "1/model.plan", "built_from": rebuild_from,
                "profile": engine_cfg}, indent=2) + "\n")
            write(home / "rebuild_engine.sh", triton_rebuild_sh(artifact, rebuild_from, plan_precision, chw,
                                                                 engine_cfg), executable=True)
        if target == "jetson":
            write(home / "build_engine.sh", build_engine_sh("model_fp16.onnx" if deployed == "fp16" else "model.onnx",
                                                            deployed, chw, engine_cfg), executable=True)
        write(home / "infer.py", INFER_PY.read_text(), executable=True)
        if target == "jetson" or plan is not None:
            write(home / "trt_exec.py", TRT_EXEC_PY.read_text())

        rows = [r for r in (report or {}).get("artifacts", []) if r.get("name") == artifact and r.get("status") == "ok"]
        bundle = {
            "format": FORMAT,
            "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "target": target,
            "precision": deployed,
            "artifact": {k: getattr(art, k)
                         for k in ("name", "stage", "parent", "model", "precision", "params", "macs")},
            "input": {"name": INPUT_NAME, "dtype": "float32", "layout": "NCHW", "shape": [-1, *chw]},
            "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": [-1, len(labels)], "meaning": "logits"},
            "preprocess": {k: v for k, v in pre.items() if k != "class_names"},
            "labels": labels,
            "accuracy": {f"{r['runtime']}/{r['precision']}": r["accuracy"] for r in rows},
            "engine": {"shipped": plan is not None, "note": engine_note,
                       "profile": engine_cfg if target in ("jetson", "triton") else None},
            "source": {
                "run_dir": str(run_dir.resolve()),
                "stage_manifest": str(rundir.manifest_path(run_dir / artifact).resolve()),
                "report": str(Path(report["_path"]).resolve()) if report else None,
                "files": {onnx_key: {"path": str(onnx_path.resolve()), "sha256": sha256_file(onnx_path)},
                          **({f"engine_{plan_precision}": {"path": str(plan.resolve()), "sha256": sha256_file(plan)}}
                             if plan is not None else {})},
                "preprocess_from": pre_source,
            },
            "versions": {**manifest.versions, "compress_deploy": compress.__version__},
            "measured_with": _measured_with(target, report, plan is not None),
            "files": shipped,
        }
        write(home / "README.txt", _readme(target, artifact, bundle, engine_note, deployed))
        bundle["files"] = dict(sorted(shipped.items()))
        inside(home / "manifest.json").write_text(json.dumps(bundle, indent=2) + "\n")
        if target == "triton":
            _place_model(home, out, artifact, force)
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            _place(tmp, out, force)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out
