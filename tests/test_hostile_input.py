"""Hostile input (issue 17): every case ends in one line on stderr, the right exit code, no traceback,
no hang, and nothing silently accepted. Items 4-10 of the issue, each with its example and more.

The CLI runs in-process (typer's runner); `validate` and `run` are asked the same questions, since
`validate` must reject everything `run` would reject for the config alone.
"""

import json
import os
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from compress.cli import app

TINY = ("name: x\ndevice: cpu\ndata: {dataset: synthetic, synthetic: {num_train: 32, num_test: 8, image_size: 8}, "
        "val_size: 8, batch_size: 8}\nexport: {parity_images: 4}\n"
        "benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1}\n")
STAGE = "stages:\n  t: {type: train, model: resnet8, epochs: 1}\n"


def cli(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line(res, code: int = 2, expect: str = "") -> str:
    """One `error:` line on stderr, and it is the last; before it only `run`'s own progress lines."""
    assert res.exit_code == code, (res.exit_code, res.output, res.exception)
    assert "Traceback" not in res.output
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], res.stderr
    assert all(line.startswith(("data: ", "[")) for line in lines[:-1]), res.stderr
    assert expect in errors[0], errors[0]
    return errors[0]


def both(tmp_path, path, *sets, expect: str = "") -> str:
    """`validate` and `run` refuse the config with the same one line, exit 2, and run writes nothing."""
    args = [a for s in sets for a in ("--set", s)]
    line = one_line(cli("validate", path, *args), 2, expect)
    out = tmp_path / "runs"
    assert one_line(cli("run", path, *args, "--out", out, "--reports", tmp_path / "rep"), 2, expect) == line
    assert not out.exists() and not (tmp_path / "rep").exists()
    return line


def write(tmp_path, text: str, name: str = "p.yaml") -> Path:
    (tmp_path / name).write_text(text)
    return tmp_path / name


# ---------------------------------------------------------------------------------------------- item 6: hangs

@pytest.mark.timeout(60)
@pytest.mark.parametrize("command", ["validate", "run"])
def test_a_fifo_pipeline_is_refused_at_once(tmp_path, command):
    fifo = tmp_path / "p.yaml"
    os.mkfifo(fifo)
    t0 = time.perf_counter()
    one_line(cli(command, fifo), 2, "is a FIFO (named pipe); the pipeline file must be a regular file")
    assert time.perf_counter() - t0 < 10


@pytest.mark.parametrize("special,kind", [("/dev/null", "character device"), ("/dev/zero", "character device"),
                                          (".", "directory")])
def test_special_files_are_refused(tmp_path, special, kind):
    one_line(cli("validate", special), 2, f"is a {kind}")


@pytest.mark.timeout(60)
def test_a_fifo_in_an_image_folder_is_refused(tmp_path):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "img" / "train" / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("L", (8, 8), 40 * i).save(tmp_path / "img" / "train" / cls / f"{i}.png")
    os.mkfifo(tmp_path / "img" / "train" / "b" / "9.png")
    path = write(tmp_path, TINY.replace("dataset: synthetic", f"dataset: imagefolder, root: {tmp_path / 'img'}")
                 + STAGE)
    one_line(cli("run", path, "--out", tmp_path / "runs", "--reports", tmp_path / "rep"), 2,
             "9.png: not a regular file")


# ---------------------------------------------------------------------------------------------- item 7: unbounded

BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")) + "name: *i\n" + STAGE


def test_an_alias_bomb_is_refused_quickly_in_one_short_line(tmp_path):
    path = write(tmp_path, BOMB)
    assert path.stat().st_size < 1024
    t0 = time.perf_counter()
    line = both(tmp_path, path, expect="once aliases are expanded")
    assert time.perf_counter() - t0 < 10 and len(line) < 300


def test_recursive_aliases_and_bombs_in_set_values(tmp_path):
    path = write(tmp_path, TINY + STAGE)
    both(tmp_path, write(tmp_path, TINY + "stages: &s\n  t: *s\n", "r.yaml"), expect="")
    bomb = "[" + ", ".join(["*a"] * 9) + "]"
    one_line(cli("validate", path, "--set", "seed=" + bomb), 2, "--set seed")


def test_a_huge_value_is_bounded(tmp_path):
    path = write(tmp_path, TINY + STAGE)
    t0 = time.perf_counter()
    line = one_line(cli("validate", path, "--set", "name=" + "n" * 50_000_000), 2, "--set name")
    assert time.perf_counter() - t0 < 10 and len(line) < 300
    big = write(tmp_path, TINY + STAGE + "# " + "x" * (2 << 20) + "\n", "big.yaml")
    assert len(one_line(cli("validate", big), 2, "larger than 1.0 MiB")) < 300
    line = one_line(cli("validate", path, "--set", "stages.t.model=" + "m" * 5000), 2, "unknown model")
    assert len(line) < 400



@pytest.mark.parametrize("setting,expect", [
    ("stages.t.lr=1e300", "stages.t.lr: expected less than or equal to 10"),
    ("stages.t.weight_decay=5", "stages.t.weight_decay: expected less than or equal to 1"),
    ("benchmark.rounds=0", "benchmark.rounds: expected greater than or equal to 1"),
    ("benchmark.rounds=1000", "benchmark.rounds: expected less than or equal to 100"),
    ("benchmark.rounds=true", "benchmark.rounds: expected a number, got the boolean true"),
])
def test_out_of_range_numbers_are_refused_before_training(tmp_path, setting, expect):
    """lr: 1e300 is finite, so it passed the non-finite check and ended later in the NaN handling (exit 1);
    benchmark.rounds is the benchmark's interleaving (at least one round)."""
    both(tmp_path, write(tmp_path, TINY + STAGE), setting, expect=expect)

# ---------------------------------------------------------------------------------------------- item 8: silently accepted

def test_duplicate_keys_are_refused_with_both_lines(tmp_path):
    path = write(tmp_path, TINY + "stages:\n  t: {type: train, model: resnet8}\n  t: {type: train, model: resnet20}\n")
    line = both(tmp_path, path, expect="duplicate key 't' (first at line 7)")
    assert f"{path}:8:" in line
    path = write(tmp_path, TINY + "stages:\n  t: {type: train, model: resnet8, epochs: 1, epochs: 2}\n")
    both(tmp_path, path, expect="duplicate key 'epochs'")
    good = write(tmp_path, TINY + STAGE, "good.yaml")
    one_line(cli("validate", good, "--set", "stages.t={type: train, model: a, model: b}"), 2, "duplicate key 'model'")


@pytest.mark.parametrize("setting,expect", [
    ("data.batch_size=true", "data.batch_size: expected a number, got the boolean true"),
    ("stages.t.epochs=false", "stages.t.epochs: expected a number, got the boolean false"),
    ("stages.t.lr=true", "stages.t.lr: expected a number"),
    ("benchmark.batch_sizes=[1, true]", "benchmark.batch_sizes: expected a number"),
    ("stages.t.weight_decay=.inf", "expected a finite number"),
    ("stages.t.lr=.nan", "expected a finite number"),
    ("stages.t.momentum=-.inf", "expected a finite number"),
    ("seed=99999999999999999999999", "is too large"),
    ("data.synthetic.num_train=4294967296", "is too large"),
    ("stages.t.epochs=1e400", ""),
])
def test_booleans_non_finite_and_overflowing_numbers(tmp_path, setting, expect):
    path = write(tmp_path, TINY + STAGE)
    line = both(tmp_path, path, setting, expect=expect)
    assert f"(--set {setting.split('=')[0]})" in line  # blamed on the --set, not a line of the file


def test_infinite_temperature_in_the_file(tmp_path):
    path = write(tmp_path, TINY + STAGE + "  s: {type: distill, from: t, model: resnet8, temperature: .inf}\n")
    line = both(tmp_path, path, expect="stages.s.temperature: expected a finite number")
    assert f"{path}:8:" in line


def test_an_image_folder_with_one_class_is_refused(tmp_path):
    from PIL import Image

    (tmp_path / "img" / "train" / "only").mkdir(parents=True)
    for i in range(4):
        Image.new("L", (8, 8), 50 * i).save(tmp_path / "img" / "train" / "only" / f"{i}.png")
    path = write(tmp_path, TINY.replace("dataset: synthetic", f"dataset: imagefolder, root: {tmp_path / 'img'}")
                 + STAGE)
    one_line(cli("run", path, "--out", tmp_path / "runs", "--reports", tmp_path / "rep"), 2,
             "needs at least two classes")


# ---------------------------------------------------------------------------------------------- item 4: tracebacks

@pytest.mark.parametrize("setting,expect", [
    ("name=" + "a" * 300, "at most 64 characters"),
    ('name="a\\0b"', "name: String should match pattern"),
    ('name="   "', "name: String should match pattern"),
    ('name="a\\nb"', "name: String should match pattern"),
    ('stages={"t\\0": {type: train, model: resnet8}}', "must be a plain name"),
    ('stages={"  ": {type: train, model: resnet8}}', "must be a plain name"),
    ('stages={"a\\nb": {type: train, model: resnet8}}', "must be a plain name"),
    ('stages={"$\\\\alpha$": {type: train, model: resnet8}}', "must be a plain name"),  # mathtext in the plot
    ("stages={" + "s" * 300 + ": {type: train, model: resnet8}}", "must be a plain name"),
    ("export.opset=99", "export.opset: expected less than or equal to 20"),
    ("export.opset=7", "export.opset: expected greater than or equal to 13"),
    ("data.synthetic.image_size=100000", "data.synthetic.image_size: expected less than or equal to 4096"),
    ("data.synthetic={num_train: 2000000000, image_size: 4096}", "do not fit in this machine"),
    ("data.synthetic.num_classes=1000", "num_classes 1000 is more than num_train"),
    ("data.image_size=1000000", "data.image_size: expected less than or equal to 4096"),
    ("stages.t.model=resnet21", "unknown model 'resnet21'; did you mean 'resnet20'?"),
    ("stages.t.model=missing.py:Net", "missing.py' does not exist"),
])
def test_values_that_used_to_fail_later_are_refused_up_front(tmp_path, setting, expect):
    path = write(tmp_path, TINY + STAGE)
    line = both(tmp_path, path, setting, expect=expect)
    assert "\\0" not in line and len(line) < 400


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_device_cuda_without_cuda(tmp_path):
    both(tmp_path, write(tmp_path, TINY.replace("device: cpu", "device: cuda") + STAGE),
         expect="device: cuda, but torch sees no CUDA GPU")


def test_out_that_is_a_file(tmp_path):
    path = write(tmp_path, TINY + STAGE)
    (tmp_path / "f").write_text("x")
    one_line(cli("run", path, "--out", tmp_path / "f", "--reports", tmp_path / "rep"), 2, "is a file, not a directory")
    one_line(cli("run", path, "--out", tmp_path / "f" / "runs"), 2, "a parent is a file")
    one_line(cli("run", path, "--out", tmp_path / "runs", "--reports", tmp_path / "f"), 2, "--reports")
    assert (tmp_path / "f").read_text() == "x" and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("args", [["--input-size", "1,0,28"], ["--input-size", "1,99999,99999"],
                                  ["--input-size", "0,28,28"], ["--num-classes", "0"], ["--num-classes", "-3"],
                                  ["--num-classes", "10000000000"], ["--input-size", "x" * 10000]])
def test_models_with_impossible_sizes(args):
    assert len(one_line(cli("models", "resnet8", *args), 2)) < 300


USER_MODELS = {
    "exits on import": ("import sys\nsys.exit(0)\n", "called sys.exit(0)"),
    "exits with a code": ("raise SystemExit(3)\n", "called sys.exit(3)"),
    "not callable": ("Net = 3\n", "is a int, not a class or function"),
    "no parameters": ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes):\n"
                      "        super().__init__(); self.k = num_classes\n"
                      "    def forward(self, x):\n        return torch.zeros(len(x), self.k)\n", "has no parameters"),
    "lazy modules": ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes):\n"
                     "        super().__init__(); self.fc = torch.nn.LazyLinear(num_classes)\n"
                     "    def forward(self, x):\n        return self.fc(x.flatten(1))\n", "uses lazy modules"),
    "batch-dependent output": ("import torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes):\n"
                               "        super().__init__(); self.fc = torch.nn.Linear(64, num_classes)\n"
                               "    def forward(self, x):\n        return self.fc(x.flatten(1))[:2]\n",
                               "returns (2, 4) for a batch of 3, expected (3, 4)"),
    "exits in forward": ("import sys, torch\nclass Net(torch.nn.Module):\n    def __init__(self, num_classes):\n"
                         "        super().__init__(); self.fc = torch.nn.Linear(64, num_classes)\n"
                         "    def forward(self, x):\n        sys.exit(0)\n", "fails on a (1, 8, 8) input: SystemExit"),
}


@pytest.mark.parametrize("case", list(USER_MODELS))
def test_hostile_user_models(tmp_path, case):
    """Item 5 (sys.exit on import made `run` exit 0 with no report) and item 4's user models."""
    body, expect = USER_MODELS[case]
    (tmp_path / "net.py").write_text(body)
    path = write(tmp_path, TINY + "stages:\n  t: {type: train, model: net.py:Net, epochs: 1}\n")
    one_line(cli("run", path, "--out", tmp_path / "runs", "--reports", tmp_path / "rep"), 2, expect)
    assert not (tmp_path / "rep").exists()


# ---------------------------------------------------------------------------------------------- item 9: messages

def test_quantize_from_quantize_names_the_real_cause(tmp_path):
    path = write(tmp_path, TINY + STAGE + "  q: {type: quantize, from: t}\n  q2: {type: quantize, from: q}\n")
    both(tmp_path, path, expect="'q' is already an INT8 ONNX model, and a quantize stage needs a PyTorch model "
                                "as its from; quantize from 't'")


def test_a_bad_set_is_reported_at_the_set(tmp_path):
    path = write(tmp_path, TINY + STAGE)
    assert "(--set stages.t.type)" in both(tmp_path, path, "stages.t.type=prune")
    assert "(--set stages.t.alpha)" in both(tmp_path, path, "stages.t.alpha=3")


def test_a_corrupt_model_file_is_not_called_pickled(tmp_path):
    from compress.io import CheckpointError, safe_load

    path = tmp_path / "model.pt"
    path.write_bytes(b"\x80\x02" + bytes(range(256)) * 4)  # a damaged pickle stream, not a hostile one
    with pytest.raises(CheckpointError) as info:
        safe_load(path)
    message = str(info.value)
    assert "corrupt or truncated" in message and "pickled Python objects" not in message
    assert "--force STAGE" in message and "\n" not in message
    os.mkfifo(tmp_path / "fifo.pt")
    with pytest.raises(CheckpointError, match="FIFO"):
        safe_load(tmp_path / "fifo.pt")


# ---------------------------------------------------------------------------------------------- item 10: one line

@pytest.mark.parametrize("args,expect", [
    (["run"], "Missing argument"), (["run", "p.yaml", "--bogus"], "No such option: --bogus"),
    (["models", "--num-classes", "x"], "Invalid value for '--num-classes'"), (["frobnicate"], "No such command"),
    (["deploy", "x"], "Missing option"), (["compare"], "Missing argument"), (["run", "p.yaml", "--nproc", "0"], "--nproc"),
])
def test_usage_errors_are_one_line(args, expect):
    line = one_line(cli(*args), 2, expect)
    assert line.startswith("error: ") and "╭" not in line


def test_an_unexpected_exception_is_one_line_naming_the_traceback_file(tmp_path, monkeypatch):
    from compress import config

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug we did not foresee")

    monkeypatch.setenv("COMPRESS_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.setattr(config, "load", broken)
    line = one_line(cli("validate", "p.yaml"), 1, "`compress validate` failed unexpectedly: ZeroDivisionError: "
                                                  "a bug we did not foresee; full traceback in ")
    trace = Path(line.rsplit("full traceback in ", 1)[1])
    assert trace.parent == tmp_path / "crash" and "Traceback (most recent call last)" in trace.read_text()

    def exits(*args, **kwargs):
        raise SystemExit(0)

    monkeypatch.setattr(config, "load", exits)
    one_line(cli("validate", "p.yaml"), 1, "was ended by sys.exit(0)")



def test_a_reader_that_went_away_is_not_an_error(tmp_path):
    """`compress validate p.yaml | head -1`: stdout's reader has closed its end; no error line, and
    the shell's code for a process ended by SIGPIPE (141), as `cat` would give."""
    import subprocess
    import sys

    (tmp_path / "p.yaml").write_text(TINY + STAGE)
    read_end, write_end = os.pipe()
    os.close(read_end)
    try:
        proc = subprocess.run([sys.executable, "-m", "compress", "validate", "p.yaml"], cwd=tmp_path, stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "COMPRESS_CRASH_DIR": str(tmp_path / "crash")})
    finally:
        os.close(write_end)
    assert (proc.returncode, proc.stderr) == (141, "")
    # With the reader there, the same command prints its line and exits 0.
    ok = subprocess.run([sys.executable, "-m", "compress", "validate", "p.yaml"], cwd=tmp_path, capture_output=True,
                        text=True, timeout=120)
    assert ok.returncode == 0 and "p.yaml: ok" in ok.stdout, ok.stderr

def test_library_warnings_go_to_a_log_file(tmp_path, monkeypatch):
    import warnings

    from compress import config

    def noisy(*args, **kwargs):
        warnings.warn("Glyph 9731 missing from current font", UserWarning)
        raise config.ConfigError("stop here")

    monkeypatch.setenv("COMPRESS_CRASH_DIR", str(tmp_path / "crash"))
    monkeypatch.setattr(config, "load", noisy)
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        res = cli("validate", "p.yaml")
    one_line(res, 2, "stop here")
    assert "Glyph" in (tmp_path / "crash" / "warnings.log").read_text()


# ---------------------------------------------------------------------------------------------- compare (item 4)

GOOD_REPORT = {"schema": "compress.report/1", "pipeline": {"name": "p"}, "artifacts": [
    {"name": "t", "runtime": "torch", "precision": "fp32", "status": "ok", "accuracy": 90.0,
     "latency_ms": {"1": {"p50": 1.0}}}]}


@pytest.mark.parametrize("report", [
    [], "text", 3, {}, {"schema": 5}, {"schema": "compress.report/1"},
    {**GOOD_REPORT, "artifacts": {"t": 1}}, {**GOOD_REPORT, "artifacts": [1, 2]},
    {**GOOD_REPORT, "artifacts": [{"name": "t"}]},
    {**GOOD_REPORT, "artifacts": [{**GOOD_REPORT["artifacts"][0], "accuracy": "high"}]},
    {**GOOD_REPORT, "artifacts": [{**GOOD_REPORT["artifacts"][0], "accuracy": True}]},
    {**GOOD_REPORT, "artifacts": [{**GOOD_REPORT["artifacts"][0], "latency_ms": {"one": {"p50": 1}}}]},
    {**GOOD_REPORT, "artifacts": [{**GOOD_REPORT["artifacts"][0], "latency_ms": {"1": 5}}]},
    {**GOOD_REPORT, "artifacts": [{**GOOD_REPORT["artifacts"][0], "latency_ms": [1]}]},
    {**GOOD_REPORT, "pipeline": "p"}, {**GOOD_REPORT, "machine": 3},
])
def test_compare_reports_of_the_wrong_shape(tmp_path, report):
    (tmp_path / "a.json").write_text(json.dumps(GOOD_REPORT))
    (tmp_path / "b.json").write_text(json.dumps(report))
    one_line(cli("compare", tmp_path / "a.json", tmp_path / "b.json"), 2, "b.json")


def test_compare_plot_paths_that_cannot_be_written(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps(GOOD_REPORT))
    (tmp_path / "f").write_text("x")
    for plot, expect in ((tmp_path, "is a directory"), (tmp_path / "f" / "p.png", "is a file, not a directory")):
        one_line(cli("compare", tmp_path / "a.json", tmp_path / "a.json", "--plot", plot), 2, expect)
    os.mkfifo(tmp_path / "fifo.json")
    one_line(cli("compare", tmp_path / "a.json", tmp_path / "fifo.json"), 2, "FIFO")


def test_compare_plots_names_that_would_break_the_font_renderer(tmp_path):
    odd = {**GOOD_REPORT, "pipeline": {"name": "$\\frac{"}, "artifacts": [
        {**GOOD_REPORT["artifacts"][0], "name": name} for name in ("$\\alpha", "a$b$c", "x" * 500, "\u2603\U0001F600")]}
    (tmp_path / "a.json").write_text(json.dumps(odd))
    res = cli("compare", tmp_path / "a.json", tmp_path / "a.json", "--plot", tmp_path / "p.png")
    assert res.exit_code == 0 and not res.stderr.strip(), res.output
    assert (tmp_path / "p.png").stat().st_size > 1000
