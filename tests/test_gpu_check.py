"""`make gpu-wheels` / `make gpu-check` (scripts/gpu_check.py): the parts that run without a GPU.

Which wheels the air-gapped GPU machine needs, the size budget, the manifest's integrity, what
set-up installs and what it leaves to the machine, the test selection, and the one-line exit 3
on a machine without a CUDA GPU. Nothing here downloads anything.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))
import gpu_check  # noqa: E402
import gpu_tests  # noqa: E402

# a small world of distributions and their requirements
REQUIRES = {
    "torch": ["sympy>=1.13", "networkx", "filelock"], "sympy": ["mpmath"], "networkx": [], "mpmath": [],
    "filelock": [], "typer": ["pydantic>=2", "shellingham", "rich"], "rich": ["pygments"], "pygments": [],
    "pydantic": ["pydantic-core==2.1", "annotated-types"], "pydantic-core": [], "annotated-types": [],
    "shellingham": [], "nncf": ["networkx", "scipy>=1.3", "scikit-learn", "tabulate; python_version>'3'",
                                "pytest; extra == 'tests'"],
    "scipy": ["numpy"], "numpy": [], "scikit-learn": ["scipy", "joblib"], "joblib": [], "tabulate": [],
    "torch-pruning": ["torch>=2", "numpy"], "pytest": ["pluggy"], "pluggy": [],
}


def requires(name):
    return REQUIRES.get(name)


def test_wanted_is_the_closure_minus_what_the_image_has():
    got = gpu_check.wanted(["torch-pruning", "nncf", "pydantic", "typer"], requires,
                           image=["torch", "typer", "rich", "numpy", "pytest"], trusted=["torch", "numpy", "pytest"])
    # torch's own dependencies are on the image; typer is, but not necessarily a pydantic (older typer)
    assert got == ["torch-pruning", "nncf", "scipy", "tabulate", "pydantic", "pydantic-core", "annotated-types"]
    assert "scikit-learn" not in got and "joblib" not in got    # declared by nncf, imported by none of it
    assert "pytest" not in got                                   # only an extra of nncf


def test_requirement_names():
    assert gpu_check.requirement_name("Scipy>=1.3; python_version<'3.12'") == "scipy"
    assert gpu_check.requirement_name("typing_extensions (>=4)") == "typing-extensions"
    assert gpu_check.requirement_name('pytest ; extra == "dev"') is None


def test_download_command_targets_the_gpu_python_without_resolving():
    cmd = gpu_check.download_command(["nncf==3.4.0"], Path("/w"), "3.12")
    assert cmd[-1] == "nncf==3.4.0" and "--no-deps" in cmd and "--only-binary=:all:" in cmd
    assert cmd[cmd.index("--python-version") + 1] == "312" and "cp312" in cmd and "abi3" in cmd


def _wheel(folder: Path, name: str, version: str, size: int) -> Path:
    path = folder / f"{name}-{version}-py3-none-any.whl"
    path.write_bytes(bytes(size))
    return path


def test_manifest_and_budget(tmp_path):
    _wheel(tmp_path, "torch_pruning", "1.6.1", 1000)
    _wheel(tmp_path, "scipy", "1.17.1", 3 * 2**20)
    with pytest.raises(gpu_check.CheckError, match=r"over the 2 MiB budget \(biggest: scipy-1.17.1"):
        gpu_check.write_manifest(tmp_path, "3.12", ["torch-pruning==1.6.1", "scipy==1.17.1"], budget_mib=2)
    assert not (tmp_path / gpu_check.MANIFEST).exists()
    with pytest.raises(gpu_check.CheckError, match="no wheel downloaded for nncf==3.4.0"):
        gpu_check.write_manifest(tmp_path, "3.12", ["nncf==3.4.0"], budget_mib=8)
    m = gpu_check.write_manifest(tmp_path, "3.12", ["torch-pruning==1.6.1", "scipy==1.17.1"], budget_mib=8)
    assert {w["name"] for w in m["wheels"]} == {"torch-pruning", "scipy"} and m["total_bytes"] == 1000 + 3 * 2**20
    assert gpu_check.load_manifest(tmp_path)["wheels"] == m["wheels"]


def test_a_changed_or_missing_wheel_is_refused(tmp_path):
    with pytest.raises(gpu_check.CheckError, match="run `make gpu-wheels`"):
        gpu_check.load_manifest(tmp_path)
    wheel = _wheel(tmp_path, "tabulate", "0.10.0", 100)
    gpu_check.write_manifest(tmp_path, "3.12", ["tabulate==0.10.0"], budget_mib=1)
    wheel.write_bytes(bytes(99) + b"x")
    with pytest.raises(gpu_check.CheckError, match="changed since `make gpu-wheels`"):
        gpu_check.load_manifest(tmp_path)
    for bad in ([1, 2], {"format": "compress.gpu-wheels/1", "wheels": [{"name": "x", "file": "../../x.whl"}]}):
        (tmp_path / gpu_check.MANIFEST).write_text(json.dumps(bad))
        with pytest.raises(gpu_check.CheckError, match="not a gpu-wheels manifest"):
            gpu_check.load_manifest(tmp_path)


def test_install_plan_leaves_the_machines_packages_alone():
    manifest = {"wheels": [{"name": n, "version": "1", "file": f"{n}.whl"} for n in
                           ("nncf", "pydantic", "setuptools", "scipy")]}
    todo, kept = gpu_check.install_plan(manifest, {"pydantic": "2.9", "scipy": "1.11"}.get)
    assert [w["name"] for w in todo] == ["nncf"]       # setuptools only builds the project
    assert kept == ["pydantic", "scipy"]                # the machine's own versions win
    # ... unless the project's pins refuse them (the H200 image's typer was older than typer>=0.27)
    manifest = {"wheels": [{"name": n, "version": v, "file": f"{n}.whl"} for n, v in
                           (("typer", "0.29.2"), ("pydantic", "2.14.3"), ("shellingham", "1.5.4"))]}
    todo, kept = gpu_check.install_plan(manifest, {"typer": "0.15.1", "pydantic": "2.9.2", "shellingham": "1.5"}.get,
                                        {"typer": ">=0.27", "pydantic": ">=2.6,<3"})
    assert [w["name"] for w in todo] == ["typer"] and kept == ["pydantic", "shellingham"]
    assert gpu_check.project_pins()["typer"] == ">=0.27"


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA GPU is present")
def test_without_a_gpu_it_says_so_in_one_line_and_exits_3(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "run", "--wheels",
                           str(tmp_path / "none"), "--work", str(tmp_path / "work")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == gpu_check.EXIT_NO_GPU == 3
    assert proc.stdout.strip().startswith("gpu-check: no CUDA GPU") and len(proc.stdout.strip().splitlines()) == 1
    assert proc.stderr == "" and not (tmp_path / "work").exists()


def test_bad_python_version_is_one_error_line():
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "gpu_check.py"), "prepare", "--python", "twelve",
                           "--wheels", "/nonexistent/w"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --python 'twelve': expected a version such as 3.12"
    assert not Path("/nonexistent/w").exists()


def _item(*reasons):
    marks = [SimpleNamespace(kwargs={"reason": r}) for r in reasons]
    return SimpleNamespace(iter_markers=lambda name: iter(marks if name == "skipif" else []))


def test_gpu_tests_are_selected_by_their_skip_reasons():
    assert gpu_tests.is_gpu_test(_item("needs a CUDA GPU"))
    assert gpu_tests.is_gpu_test(_item("needs tensorrt and a CUDA GPU"))
    assert not gpu_tests.is_gpu_test(_item("tensorrt and a GPU are present"))   # a CPU-only test
    assert not gpu_tests.is_gpu_test(_item("needs bash"))
    assert not gpu_tests.is_gpu_test(_item())


def test_the_gpu_check_pipeline_validates():
    proc = subprocess.run([sys.executable, "-m", "compress", "validate", str(ROOT / "pipelines" / "gpu-check.yaml"),
                           "--set", "device=cpu"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    for stage in ("teacher", "student", "student-pruned", "student-int8", "student-ptq"):
        assert stage in proc.stdout
    cfg = json.dumps(__import__("yaml").safe_load((ROOT / "pipelines" / "gpu-check.yaml").read_text()))
    assert '"device": "cuda"' in cfg and '"tensorrt"' in cfg


def test_the_fashion_gpu_pipeline_keeps_its_students_under_a_tenth_of_the_teacher():
    import yaml

    from compress.registry import count_macs, create_model

    proc = subprocess.run([sys.executable, "-m", "compress", "validate", str(ROOT / "pipelines" / "fashion-gpu.yaml"),
                           "--set", "device=cpu"], capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load((ROOT / "pipelines" / "fashion-gpu.yaml").read_text())
    text = (ROOT / "pipelines" / "fashion-gpu.yaml").read_text()
    assert cfg["device"] == "cuda" and "Expected wall time" in text and "Basis" in text
    stages = cfg["stages"]
    macs = {name: count_macs(create_model(s["model"], num_classes=10, in_channels=1), (1, 28, 28))
            for name, s in stages.items() if s["type"] in ("train", "distill")}
    students = [n for n, s in stages.items() if s["type"] == "distill"]
    assert students and all(macs[n] <= macs["teacher"] / 10 for n in students), macs
    assert {s["from"] for s in stages.values() if s["type"] == "quantize"} == set(students)  # each gets INT8


@pytest.mark.skipif(torch.cuda.is_available() or not __import__("shutil").which("make"),
                    reason="a CUDA GPU is present, or no make")
def test_make_gpu_check_on_a_cpu_machine_is_one_line(tmp_path):
    proc = subprocess.run(["make", "--no-print-directory", "gpu-check", f"PYTHON={sys.executable}",
                           f"GPU_WHEELS={tmp_path / 'w'}", f"GPU_CHECK_OUT={tmp_path / 'out.json'}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Error 3" in proc.stderr       # the script's distinct code, through make
    assert proc.stdout.strip().startswith("gpu-check: no CUDA GPU") and len(proc.stdout.strip().splitlines()) == 1
    assert not (tmp_path / "out.json").exists()


def test_a_failed_set_up_is_a_failed_check_with_a_summary(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_check, "gpu_status", lambda: (True, "NVIDIA Test GPU, torch 2.11.0, CUDA 12.8"))
    out = tmp_path / "summary.json"
    rc = gpu_check.run(tmp_path / "no-wheels", out, tmp_path / "work")
    assert rc == gpu_check.EXIT_FAILED == 1
    summary = json.loads(out.read_text())
    assert summary["passed"] is False and summary["gpu"].startswith("NVIDIA Test GPU")
    assert summary["setup"]["passed"] is False and "make gpu-wheels" in summary["setup"]["error"]
    assert summary["checks"] == [] and "FAILED" in capsys.readouterr().out


@pytest.mark.skipif(sys.prefix == sys.base_prefix, reason="needs to run inside a venv (as make test does)")
def test_a_venv_made_from_a_venvs_python_sees_that_venvs_packages(tmp_path):
    """The GPU machine's python3 is a venv's: --system-site-packages alone reached the base Python and the
    check's venv saw no torch or typer (every check failed on the first H200 run)."""
    venv = tmp_path / "v"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    probe = [str(venv / "bin" / "python"), "-c", "import typer, torch; print(typer.__file__)"]
    assert subprocess.run(probe, capture_output=True).returncode != 0  # the bug, as it was
    pth = gpu_check.inherit_site_packages(venv)
    assert pth is not None and pth.is_file()
    seen = subprocess.run(probe, capture_output=True, text=True)
    assert seen.returncode == 0, seen.stderr
    assert Path(seen.stdout.strip()).resolve().is_relative_to(Path(sys.prefix).resolve())
    # the venv's own folder still comes first, so what the check installs wins over the machine's
    order = subprocess.run([str(venv / "bin" / "python"), "-c", "import sys; print('\\n'.join(sys.path))"],
                           capture_output=True, text=True, check=True).stdout.splitlines()
    own = next(i for i, p in enumerate(order) if p.startswith(str(venv)))
    parent = next(i for i, p in enumerate(order) if p.startswith(sys.prefix) and not p.startswith(str(venv)))
    assert own < parent
    assert gpu_check.inherit_site_packages(venv, parent=[]) is None


def test_torchvision_check_bad_input_and_no_torchvision(tmp_path):
    script = ROOT / "scripts" / "torchvision_check.py"
    out = tmp_path / "tv.json"
    bad = subprocess.run([sys.executable, str(script), "--archs", "resnet18,vgg16", "--out", str(out)],
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.strip().startswith("error: --archs: unknown vgg16")
    assert len(bad.stderr.strip().splitlines()) == 1 and not out.exists()
    if __import__("importlib.util").util.find_spec("torchvision") is None:  # the CPU machines: it says so, exit 3
        none = subprocess.run([sys.executable, str(script), "--out", str(out)], capture_output=True, text=True,
                              timeout=120)
        assert none.returncode == 3 and "torchvision does not import here" in none.stdout and not out.exists()
