"""Bad input, each kind: `compress run` prints one `error:` line, no traceback, exits 2, overwrites nothing.

The CLI runs in-process (typer's runner) on the smallest pipelines that reach each check; the
real-process versions of a few of these are in test_cli.py and test_faults.py.
"""

import hashlib
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from compress.cli import app
from compress.data.idx import write_idx
from compress.data.fashion_mnist import FILES
from tests.conftest import TINY_DATA

GOOD_STAGE = "  t: {type: train, model: resnet8, epochs: 1}\n"


def run_cli(*args):
    return CliRunner().invoke(app, ["run", *map(str, args)])


def pipeline(tmp_path: Path, body: str, data: str = TINY_DATA) -> Path:
    path = tmp_path / "p.yaml"
    path.write_text("name: x\ndevice: cpu\n" + data + body)
    return path


def previous_run(out: Path) -> dict[Path, str]:
    """A run directory as an earlier run left it; returns each file's hash."""
    stage = out / "x" / "t"
    stage.mkdir(parents=True)
    (stage / "manifest.json").write_text('{"status": "done", "key": "an older config"}\n')
    (stage / "model.pt").write_bytes(b"weights of an earlier run")
    return snapshot(out)


def snapshot(out: Path) -> dict[Path, str]:
    return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(out.rglob("*"))
            if p.is_file() and p.name != ".lock"}


def assert_one_line_exit_2(result, expect: str) -> str:
    assert result.exit_code == 2, (result.exit_code, result.output, result.exception)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert result.stderr.strip().splitlines()[-1] == errors[0]  # the last word, and a whole line
    assert expect in errors[0], errors[0]
    return errors[0]


def write_module(tmp_path: Path, body: str) -> None:
    (tmp_path / "net.py").write_text(textwrap.dedent(body))


BAD_PIPELINES = {
    "malformed YAML": ("stages: [\n", "malformed YAML"),
    "unknown key": ("stages:\n  t: {type: train, model: resnet8, epoch: 1}\n",
                    "stages.t.epoch: unknown key 'epoch'; did you mean 'epochs'?"),
    "wrong type": ("stages:\n  t: {type: train, model: resnet8, epochs: many}\n",
                   "stages.t.epochs: expected a valid integer"),
    "from names no stage": ("stages:\n" + GOOD_STAGE + "  s: {type: distill, from: teachr, model: resnet8}\n",
                            "stages.s.from: no stage named 'teachr'"),
    "cycle": ("stages:\n  a: {type: distill, from: b, model: resnet8}\n  b: {type: distill, from: a, model: resnet8}\n",
              "the stages a, b depend on each other in a cycle"),
    "name escapes the run dir": ("stages:\n" + GOOD_STAGE, "name: String should match pattern"),
    "stage name with a slash": ("stages:\n  ../t: {type: train, model: resnet8}\n", "must be a plain name"),
    "unknown model": ("stages:\n  t: {type: train, model: resnet21, epochs: 1}\n",
                      "unknown model 'resnet21'; did you mean 'resnet20'?"),
    "user module missing": ("stages:\n  t: {type: train, model: nope.py:Net, epochs: 1}\n", "nope.py' does not exist"),
    "user module raises on import": ("stages:\n  t: {type: train, model: net.py:Net, epochs: 1}\n",
                                     "importing"),
    "wrong number of outputs": ("stages:\n  t: {type: train, model: net.py:Net, epochs: 1}\n",
                                "returns (2, 3) for a batch of 2, expected (2, 4) logits"),
}


@pytest.mark.parametrize("case", list(BAD_PIPELINES))
def test_bad_pipeline(tmp_path, case):
    body, expect = BAD_PIPELINES[case]
    path = pipeline(tmp_path, body)
    if case == "name escapes the run dir":
        path.write_text(path.read_text().replace("name: x", "name: ../x"))
    if case == "user module raises on import":
        write_module(tmp_path, """\
            import torch
            raise RuntimeError("this module is broken\\nover two lines")
            """)
    if case == "wrong number of outputs":
        write_module(tmp_path, """\
            import torch
            class Net(torch.nn.Module):
                def __init__(self, in_channels=1, num_classes=10):
                    super().__init__()
                    self.fc = torch.nn.Linear(in_channels, 3)  # ignores num_classes
                def forward(self, x):
                    return self.fc(x.mean((2, 3)))
            """)
    out = tmp_path / "runs"
    before = previous_run(out)
    line = assert_one_line_exit_2(run_cli(path, "--out", out, "--reports", tmp_path / "rep"), expect)
    if case == "user module raises on import":
        assert "this module is broken over two lines" in line
    assert snapshot(out) == before
    assert not (tmp_path / "rep").exists()


def fake_fashion(root: Path) -> None:
    rng = np.random.default_rng(0)
    for name in FILES:
        n = 20 if name.startswith("train") else 10
        write_idx(root / name, rng.integers(0, 256, (n, 28, 28), dtype=np.uint8) if "images" in name
                  else rng.integers(0, 10, n, dtype=np.uint8))


def png(path: Path, value: int) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, dtype=np.uint8)).save(path)


def bad_data(case: str, tmp_path: Path) -> tuple[str, str]:
    """Write the dataset for a case; return the pipeline's data section and the expected message."""
    root = tmp_path / "data"
    if case == "dataset path missing":
        return f"data: {{root: {root}}}\n", f"data.root {root}: no such directory"
    if case == "fashion-mnist dir empty":
        root.mkdir()
        return f"data: {{root: {root}}}\n", "missing train-images-idx3-ubyte, train-labels-idx1-ubyte"
    if case == "imagefolder dir empty":
        root.mkdir()
        return f"data: {{dataset: imagefolder, root: {root}}}\n", "no train/ folder"
    if case == "truncated IDX":
        fake_fashion(root)
        images = root / FILES[0]
        images.write_bytes(images.read_bytes()[:-100])
        return f"data: {{root: {root}}}\n", f"{images}: truncated IDX file"
    if case == "corrupted image":
        for label in ("a", "b"):
            for i in range(3):
                png(root / "train" / label / f"{i}.png", 60 * i)
        broken = root / "train" / "b" / "1.png"
        broken.write_bytes(broken.read_bytes()[:30])
        return f"data: {{dataset: imagefolder, root: {root}, val_size: 1}}\n", f"{broken}: unreadable image"
    raise AssertionError(case)


@pytest.mark.parametrize("case", ["dataset path missing", "fashion-mnist dir empty", "imagefolder dir empty",
                                  "truncated IDX", "corrupted image"])
def test_bad_dataset(tmp_path, case):
    data, expect = bad_data(case, tmp_path)
    path = pipeline(tmp_path, "stages:\n" + GOOD_STAGE, data=data)
    out = tmp_path / "runs"
    before = previous_run(out)
    assert_one_line_exit_2(run_cli(path, "--out", out, "--reports", tmp_path / "rep"), expect)
    assert snapshot(out) == before


def test_pickled_model_file_is_refused(tmp_path):
    from compress.io import CheckpointError, load_model

    path = tmp_path / "model.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module: loading it could run code
    with pytest.raises(CheckpointError, match="refused: the model file holds pickled Python objects") as info:
        load_model(path)
    assert "\n" not in str(info.value)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="not a readable model file \\(corrupt or truncated"):
        load_model(path)


@settings(max_examples=200, deadline=None)
@given(header=st.sampled_from([b"", b"\0\0\x08\x03", b"\0\0\x08\x01", b"\0\0\x0d\x02", b"\x1f\x8b"]),
       dims=st.lists(st.integers(0, 300), max_size=3), body=st.binary(max_size=300))
def test_random_idx_bytes_never_raise_anything_but_data_error(header, dims, body):
    from compress.data import DataError
    from compress.data.idx import IMAGES_MAGIC, parse_idx

    data = header + b"".join(d.to_bytes(4, "big") for d in dims) + body
    for magic in (None, IMAGES_MAGIC):
        try:
            array = parse_idx(data, "fuzz", magic)
        except DataError as exc:
            assert "\n" not in str(exc) and str(exc).startswith("fuzz: ")
        else:
            assert array.size * array.itemsize == len(data) - 4 - 4 * data[3]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(overrides=st.lists(st.text(alphabet="abcdefghijklmnopqrstuvwxyz_.=[]{}:,0123456789 -'\"", max_size=30)
                          | st.sampled_from(["stages.t.epochs=0", "stages.t=3", "stages.t.type=prune", "seed=x",
                                             "data.synthetic.image_size=2", "name=../up", "stages.t.from=t",
                                             "stages=[]", "data=null", "benchmark.batch_sizes=[0]"]),
                          max_size=3))
def test_random_overrides_never_raise_anything_but_config_error(tmp_path, overrides):
    from compress.config import ConfigError, load

    path = pipeline(tmp_path, "stages:\n" + GOOD_STAGE)
    try:
        load(path, overrides)
    except ConfigError as exc:
        assert "\n" not in str(exc)
