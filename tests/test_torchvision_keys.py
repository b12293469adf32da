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


@pytest.mark.parametrize("arch", ["resnet18", "mobilenet_v2", "shufflenet_v2_x0_5"])  # v3: tests/test_import_e2e.py
def test_real_resolution_models_prune_export_and_reload(arch, tmp_path):
    """One of each family pruned to half its MACs at 64 px: it still maps images to logits, reloads exactly
    from compress's model file and exports to ONNX with parity."""
    from compress.onnx_export import check_parity, export_onnx
    from compress.prune import prune_model
    from compress.registry import count_macs

    torch.manual_seed(0)
    model = create_model(arch, num_classes=5, in_channels=3).eval()
    before = count_macs(model, (3, 64, 64))
    prune_model(model, torch.randn(2, 3, 64, 64), target="macs", ratio=0.5, iterative_steps=1)
    model.eval()
    assert count_macs(model, (3, 64, 64)) <= 0.5 * before
    x = torch.randn(3, 3, 64, 64)
    path = save_model(model, tmp_path / "m.pt", name=arch, num_classes=5, in_channels=3)
    with torch.no_grad():
        assert model(x).shape == (3, 5)
        torch.testing.assert_close(load_model(path).eval()(x), model(x), rtol=0, atol=0)
    onnx = export_onnx(model, tmp_path / "m.onnx", (3, 64, 64))
    parity = check_parity(model, onnx, x)
    assert parity["top1_agreement"] == 1.0, parity
