"""The bundle's build_engine.sh against stand-in trtexec programs (no TensorRT needed).

The help check used to be `trtexec --help | grep -q -- --stronglyTyped` under `set -o pipefail`:
grep exits at its first match, trtexec still writing a long help text dies of SIGPIPE, and the
pipeline fails on a good TensorRT install at random.
"""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from compress.deploy import build_engine_sh

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")

ENGINE = {"min_batch": 1, "opt_batch": 8, "max_batch": 32}


def _bundle(tmp_path: Path) -> Path:
    home = tmp_path / "bundle"
    home.mkdir()
    (home / "model.onnx").write_bytes(b"onnx")
    script = home / "build_engine.sh"
    script.write_text(build_engine_sh("model.onnx", "int8", [1, 28, 28], ENGINE))
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return home


def _trtexec(tmp_path: Path, help_text: str) -> Path:
    """A stand-in: `--help` prints help_text (from a file, so it is written fast and in full);
    otherwise it records its arguments and writes the --saveEngine file."""
    (tmp_path / "help.txt").write_text(help_text)
    exe = tmp_path / "trtexec"
    exe.write_text(f"""#!/usr/bin/env bash
if [ "$1" = "--help" ]; then cat "{tmp_path / 'help.txt'}"; exit 0; fi
printf '%s\\n' "$@" > "{tmp_path / 'args.txt'}"
for a in "$@"; do case "$a" in --saveEngine=*) echo plan > "${{a#--saveEngine=}}";; esac; done
""")
    exe.chmod(0o755)
    return exe


def _run(home: Path, trtexec: Path | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TRTEXEC": str(trtexec)}
    return subprocess.run(["bash", str(home / "build_engine.sh")], env=env, capture_output=True, text=True,
                          timeout=60)


def test_long_help_text_passes_50_runs_out_of_50(tmp_path):
    # the flag near the top and ~250 kB after it: far more than a pipe buffer once grep has gone
    filler = "".join(f"  --option{i}=<value>   Some option described at length, line {i}.\n" for i in range(4000))
    exe = _trtexec(tmp_path, "=== Build Options ===\n  --stronglyTyped   Create a strongly typed network.\n" + filler)
    home = _bundle(tmp_path)
    results = [_run(home, exe) for _ in range(50)]
    failed = [r for r in results if r.returncode != 0]
    assert not failed, (len(failed), failed[0].stderr)
    args = (tmp_path / "args.txt").read_text().split()
    assert "--onnx=model.onnx" in args and "--stronglyTyped" in args
    assert "--minShapes=input:1x1x28x28" in args and "--maxShapes=input:32x1x28x28" in args
    assert (home / "model.plan").read_text() == "plan\n"


def test_missing_trtexec_says_not_found(tmp_path):
    home = _bundle(tmp_path)
    res = _run(home, tmp_path / "no" / "trtexec")
    assert res.returncode == 1
    assert res.stderr.strip().splitlines() == [res.stderr.strip()]  # one line
    assert "trtexec not found" in res.stderr and "stronglyTyped" not in res.stderr
    assert not (home / "model.plan").exists()


def test_old_trtexec_without_strongly_typed_is_refused(tmp_path):
    exe = _trtexec(tmp_path, "TensorRT 8.6\n  --fp16  Enable fp16\n" * 2000)
    home = _bundle(tmp_path)
    res = _run(home, exe)
    assert res.returncode == 1 and "has no --stronglyTyped (TensorRT < 10?)" in res.stderr
    assert not (home / "model.plan").exists() and not (tmp_path / "args.txt").exists()
