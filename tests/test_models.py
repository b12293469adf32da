"""Every registered model, parametrized over the registry itself: a new model is tested the moment it exists."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from compress.io import load_model, save_model
from compress import registry
from compress.registry import ModelError, count_macs, count_params, create_model, list_models, model_family

MODELS = list_models()


def test_zoo_is_registered():
    for name in ("resnet8", "resnet20", "resnet32", "resnet56", "resnet18_cifar", "resnet34_cifar", "resnet50_cifar",
                 "resnet18", "resnet34", "resnet50", "mobilenet_v2", "mobilenet_v3_small", "mobilenet_v3_large",
                 "shufflenet_v2_x0_5", "shufflenet_v2_x1_0",
                 "mobilenetv2_x0_35", "mobilenetv2_x0_5", "mobilenetv2_x0_75", "mobilenetv2_x1_0",
                 "mobilenetv3_small", "mobilenetv3_large",
                 "shufflenetv2_x0_5", "shufflenetv2_x1_0", "shufflenetv2_x1_5", "shufflenetv2_x2_0"):
        assert name in MODELS


@pytest.mark.parametrize("name", MODELS)
def test_family_module_names_its_paper(name):
    family = sys.modules[registry._MODELS[name].__module__]
    assert family.__doc__ and "et al." in family.__doc__.splitlines()[0], "the docstring should open with the paper"
    assert model_family(name) == family.__name__.rsplit(".", 1)[-1]


@pytest.mark.parametrize("name", MODELS)
def test_forward_shapes(name):
    torch.manual_seed(0)
    gray = create_model(name, num_classes=10, in_channels=1).eval()
    assert isinstance(gray.fc, nn.Linear) and gray.fc.out_features == 10
    assert not isinstance(gray, nn.Sequential)  # NNCF needs a real forward
    rgb = create_model(name, num_classes=7, in_channels=3).eval()
    with torch.no_grad():
        assert gray(torch.randn(2, 1, 28, 28)).shape == (2, 10)
        assert rgb(torch.randn(2, 3, 32, 32)).shape == (2, 7)
        assert gray(torch.randn(2, 1, 8, 8)).shape == (2, 10)  # global pooling: any size >= 8


@pytest.mark.parametrize("name", MODELS)
def test_backward_gives_finite_grads(name):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1).train()
    x, y = torch.randn(4, 1, 16, 16), torch.tensor([0, 1, 2, 3])
    nn.functional.cross_entropy(model(x), y).backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("name", MODELS)
def test_params_and_macs_are_positive(name):
    model = create_model(name, num_classes=10, in_channels=1)
    assert count_params(model) > 0
    assert count_macs(model, (1, 28, 28)) > count_params(model)  # convolutions reuse weights across pixels


@pytest.mark.parametrize("name", MODELS)
def test_save_load_round_trip(name, tmp_path):
    torch.manual_seed(0)
    model = create_model(name, num_classes=10, in_channels=1)
    model.train()(torch.randn(4, 1, 16, 16))  # move the BN running statistics off their defaults
    model.eval()
    path = save_model(model, tmp_path / "m.pt", name=name, num_classes=10, in_channels=1)
    loaded = load_model(path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_user_module_builds_through_create_model(tmp_path):
    (tmp_path / "mynet.py").write_text(
        "import torch\n"
        "from torch import nn\n\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self, num_classes=10, in_channels=3):\n"
        "        super().__init__()\n"
        "        self.conv = nn.Conv2d(in_channels, 8, 3, padding=1)\n"
        "        self.fc = nn.Linear(8, num_classes)\n\n"
        "    def forward(self, x):\n"
        "        return self.fc(torch.relu(self.conv(x)).mean((2, 3)))\n")
    model = create_model("mynet.py:TinyNet", num_classes=4, in_channels=1, base_dir=tmp_path)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 4)
    model = create_model(str(tmp_path / "mynet.py") + ":TinyNet", num_classes=3, in_channels=2)
    assert model(torch.randn(2, 2, 12, 12)).shape == (2, 3)


def test_unknown_name_suggests_the_closest():
    with pytest.raises(ModelError, match="did you mean 'resnet20'"):
        create_model("resnet_20")
    with pytest.raises(ModelError, match="unknown model"):
        create_model("no_such_network_at_all")
