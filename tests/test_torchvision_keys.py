"""The real-resolution zoo against torchvision, without torchvision: keys, shapes and outputs from a committed list.

tests/data/torchvision_keys/<arch>.json was made from torchvision 0.29.1's own model sources
(generate.py there says how); torchvision itself does not import next to the CPU torch used here.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from compress.io import load_model, save_model
from compress.registry import create_model, list_models

DATA = Path(__file__).parent / "data" / "torchvision_keys"
ARCHS = sorted(p.stem for p in DATA.glob("*.json"))
_spec = importlib.util.spec_from_file_location("tv_generate", DATA / "generate.py")
generate = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(generate)


def test_every_listed_architecture_is_registered():
    assert set(ARCHS) == set(generate.ARCHS) and len(ARCHS) == 8
    assert set(ARCHS) <= set(list_models())


@pytest.mark.parametrize("arch", ARCHS)
def test_keys_and_shapes_match_torchvision(arch):
    expected = json.loads((DATA / f"{arch}.json").read_text())["keys"]
    ours = {k: list(v.shape) for k, v in create_model(arch, num_classes=1000, in_channels=3).state_dict().items()}
    assert list(ours) == list(expected)  # same names, same order
    assert ours == expected


@pytest.mark.parametrize("arch", ARCHS)
def test_torchvision_weights_give_torchvision_outputs(arch, tmp_path):
    doc = json.loads((DATA / f"{arch}.json").read_text())
    model = create_model(arch, num_classes=10, in_channels=3).eval()
    model.load_state_dict(generate.synthetic_weights({k: list(v.shape) for k, v in model.state_dict().items()}))
    with torch.no_grad():
        torch.testing.assert_close(model(generate.input_batch()), torch.tensor(doc["logits_10_classes"]),
                                   rtol=1e-4, atol=1e-4)
    # and the weights survive compress's own model file
    path = save_model(model, tmp_path / "m.pt", name=arch, num_classes=10, in_channels=3)
    with torch.no_grad():
        torch.testing.assert_close(load_model(path).eval()(generate.input_batch()), model(generate.input_batch()))
