"""`compress init`: a commented starter pipeline that validates, never over an existing file, and one-line errors."""

from __future__ import annotations

import pytest
import torch
from typer.testing import CliRunner

from compress.cli import app
from compress.config import load
from compress.registry import create_model
from tests.test_preprocess import make_jpeg_folder


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("init")
    make_jpeg_folder(tmp / "imgs", classes=3, per_class=4, test_per_class=1, size=(300, 260))
    torch.manual_seed(0)
    torch.save({"state_dict": create_model("resnet18", num_classes=3, in_channels=3).state_dict()}, tmp / "mine.pth")
    torch.save(create_model("resnet18", num_classes=1000, in_channels=3).state_dict(), tmp / "imagenet.pth")
    torch.save(create_model("resnet34", num_classes=3, in_channels=3).state_dict(), tmp / "r34.pth")
    torch.save(torch.nn.Linear(2, 2), tmp / "pickled.pt")
    return tmp


def init(folder, *args):
    return CliRunner().invoke(app, ["init", *map(str, args)], catch_exceptions=False)


def test_writes_a_valid_commented_pipeline_and_refuses_to_overwrite(folder):
    out = folder / "p.yaml"
    res = init(folder, "resnet18", "--weights", folder / "mine.pth", "--data", folder / "imgs", "-o", out)
    assert res.exit_code == 0, res.output
    assert f"compress run {out}" in res.output
    text = out.read_text()
    assert text.count("#") > 10  # commented
    cfg = load(out)
    assert [s.type for s in cfg.stages.values()] == ["import", "distill", "prune", "quantize"]
    assert cfg.stages["student"].model == "mobilenet_v3_small"
    assert (cfg.data.image_size, cfg.data.resize, cfg.data.normalize) == (224, 256, "imagenet")
    assert str(cfg.stages["teacher"].weights) == "mine.pth"   # relative to the pipeline file
    again = init(folder, "resnet18", "--data", folder / "imgs", "-o", out)
    assert again.exit_code == 2 and "does not overwrite" in again.output
    assert out.read_text() == text


def test_weights_for_other_classes_become_a_fine_tune(folder):
    out = folder / "ft.yaml"
    res = init(folder, "resnet18", "--weights", folder / "imagenet.pth", "--data", folder / "imgs", "-o", out)
    assert res.exit_code == 0, res.output
    teacher = load(out).stages["teacher"]
    assert teacher.type == "train" and teacher.reinit_classifier and str(teacher.weights) == "imagenet.pth"


def test_without_weights_a_small_model_is_trained_at_32_px(folder):
    out = folder / "small.yaml"
    assert init(folder, "resnet8", "--data", folder / "imgs", "-o", out).exit_code == 0
    cfg = load(out)
    assert cfg.stages["teacher"].type == "train" and cfg.data.image_size == 32 and cfg.data.resize is None
    assert cfg.stages["student"].model == "mobilenetv2_x0_5"


@pytest.mark.parametrize("args, message", [
    (["resnet_18", "--data", "{d}/imgs"], "unknown model 'resnet_18'; did you mean 'resnet18'?"),
    (["resnet18", "--data", "{d}/nope"], "no such directory"),
    (["resnet18", "--data", "{d}"], "no train/ folder"),
    (["resnet18", "--data", "{d}/imgs", "--weights", "{d}/none.pth"], "no such file"),
    (["resnet18", "--data", "{d}/imgs", "--weights", "{d}/r34.pth"], "weights do not fit 'resnet18': 96 unexpected"),
    (["resnet18", "--data", "{d}/imgs", "--weights", "{d}/pickled.pt"], "holds pickled Python objects"),
])
def test_bad_requests_are_one_line_and_write_nothing(folder, args, message):
    out = folder / "bad.yaml"
    res = init(folder, *[a.format(d=folder) for a in args], "-o", out)
    assert res.exit_code == 2 and message in " ".join(res.output.split()), res.output
    assert res.output.strip().startswith("error:") and not out.exists()
    assert not list(folder.glob(".bad.yaml*"))
