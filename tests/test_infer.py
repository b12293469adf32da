"""compress/infer.py, the program every deploy bundle ships: importable, and its preprocessing exact."""

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from compress import deploy, infer


@pytest.fixture
def bundle(tmp_path, monkeypatch):
    def make(pre: dict):
        home = tmp_path / "bundle"  # a directory of its own: deploy tests treat stray manifests as runs
        home.mkdir()
        (home / "manifest.json").write_text(json.dumps({"format": deploy.FORMAT, "preprocess": pre,
                                                        "labels": ["a", "b"]}))
        monkeypatch.setattr(infer, "HERE", home)
        infer.manifest.cache_clear()
        return home
    yield make
    infer.manifest.cache_clear()


def test_preprocess_scales_normalizes_and_resizes(bundle, tmp_path):
    bundle({"channels": 1, "size": [4, 4], "scale": 1 / 255, "mean": [0.5], "std": [0.25]})
    pixels = np.arange(64, dtype=np.uint8).reshape(8, 8) * 4
    Image.fromarray(pixels).save(tmp_path / "x.png")
    x = infer.preprocess(tmp_path / "x.png")
    resized = np.asarray(Image.fromarray(pixels).resize((4, 4), Image.Resampling.BILINEAR), np.float32)
    assert x.shape == (1, 1, 4, 4) and x.dtype == np.float32
    np.testing.assert_allclose(x[0, 0], (resized / 255 - 0.5) / 0.25, rtol=1e-6)


def test_find_looks_in_the_bundle_and_a_triton_model_directory(bundle, tmp_path):
    home = bundle({"channels": 1, "size": [2, 2], "scale": 1.0, "mean": [0], "std": [1]})
    assert infer.find("model.plan") is None
    (home / "1").mkdir()
    (home / "1" / "model.plan").write_bytes(b"")
    assert infer.find("model.plan") == home / "1" / "model.plan"


def test_deploy_ships_this_file_and_the_tensorrt_runner():
    assert deploy.INFER_PY.read_text().startswith("#!/usr/bin/env python3")
    assert deploy.INFER_PY.resolve() == Path(infer.__file__).resolve()
    assert "class EngineExec" in deploy.TRT_EXEC_PY.read_text()
    imports = [line for line in deploy.TRT_EXEC_PY.read_text().splitlines() if line.startswith(("from ", "import "))]
    assert not [line for line in imports if "compress" in line]  # it runs inside bundles, without compress
