"""Structured pruning: one model of every family, pruned to half its MACs, must stay a working,
savable, exportable model of the same task."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from compress.io import load_model, save_model
from compress.registry import count_macs, create_model
from compress.stages.prune import prune_model

FAMILIES = ["resnet20", "resnet18", "mobilenetv2_x0_5", "mobilenetv3_small", "shufflenetv2_x0_5"]
ROUND_TO = 8


def _like_trained(model: nn.Module) -> nn.Module:
    """Give BN layers and the classifier non-default values, so importance ranking and the
    output comparisons below are not trivially satisfied by zeros and ones."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
        model.fc.weight.normal_(0, 0.5, generator=g)
    return model.eval()


@pytest.fixture(scope="module", params=FAMILIES)
def pruned(request):
    """(name, original model, pruned model, prune_model's result), pruned once per module."""
    name = request.param
    torch.manual_seed(0)
    original = _like_trained(create_model(name, num_classes=10, in_channels=1))
    model = _like_trained(create_model(name, num_classes=10, in_channels=1))
    result = prune_model(model, torch.randn(4, 1, 28, 28), target="macs", ratio=0.5, round_to=ROUND_TO)
    return name, original, model, result


def test_macs_halve(pruned):
    name, original, model, result = pruned
    assert set(result) >= {"macs_before", "macs_after", "params_before", "params_after", "steps"}
    assert result["macs_before"] == count_macs(original, (1, 28, 28))
    assert result["macs_after"] == count_macs(model, (1, 28, 28))
    assert 0.40 * result["macs_before"] <= result["macs_after"] <= 0.50 * result["macs_before"]
    assert result["params_after"] < result["params_before"]


def test_pruned_model_still_trains(pruned):
    _, _, model, _ = pruned
    assert model.fc.out_features == 10
    model.train()
    out = model(torch.randn(4, 1, 28, 28))
    assert out.shape == (4, 10)
    nn.functional.cross_entropy(out, torch.arange(4)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    model.zero_grad(set_to_none=True)
    model.eval()


def test_pruned_channels_are_multiples_of_round_to(pruned):
    _, original, model, _ = pruned
    before = {n: m for n, m in original.named_modules() if isinstance(m, nn.Conv2d)}
    changed = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != before[n].out_channels:
            changed += 1
            assert m.out_channels % ROUND_TO == 0 and m.out_channels > 0, n
            assert m.groups in (1, m.out_channels), n  # depthwise layers stay depthwise
    assert changed > 0


def test_pruned_model_round_trips_through_save_load(pruned, tmp_path):
    name, _, model, _ = pruned
    path = save_model(model, tmp_path / "pruned.pt", name=name, num_classes=10, in_channels=1)
    loaded = load_model(path).eval()
    x = torch.randn(2, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_pruned_model_exports_to_onnx(pruned, tmp_path):
    import onnxruntime as ort

    name, _, model, _ = pruned
    x = torch.randn(3, 1, 28, 28)
    path = tmp_path / f"{name}.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the TorchScript exporter is deprecated but fast and exact here
        torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["x"], output_names=["logits"],
                          dynamic_axes={"x": {0: "batch"}, "logits": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        want = model(x).numpy()
    assert np.abs(want).max() > 1e-2  # a meaningful comparison, not zeros against zeros
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


# --- the API around the pruning loop, on the smallest model ---------------------------------


def _resnet8() -> nn.Module:
    torch.manual_seed(0)
    return _like_trained(create_model("resnet8", num_classes=10, in_channels=1))


def test_params_target_and_calibration_rounds():
    model, calls = _resnet8(), []
    result = prune_model(model, torch.randn(2, 1, 28, 28), target="params", ratio=0.6, importance="l1",
                         iterative_steps=3, calib_fn=lambda m: calls.append(m))
    assert result["params_after"] <= 0.6 * result["params_before"]
    assert result["steps"] == 3 and len(calls) == 3 and all(m is model for m in calls)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_random_importance_and_training_mode_is_kept():
    model = _resnet8().train()
    prune_model(model, torch.randn(2, 1, 28, 28), ratio=0.7, importance="random")
    assert model.training


def test_ratio_one_is_a_no_op():
    model = _resnet8()
    result = prune_model(model, torch.randn(2, 1, 28, 28), ratio=1.0)
    assert result["macs_after"] == result["macs_before"]


def test_unreachable_target_raises():
    with pytest.raises(ValueError, match="cannot prune to 0.1% of the macs"):
        prune_model(_resnet8(), torch.randn(2, 1, 28, 28), ratio=0.001)


@pytest.mark.parametrize("kwargs, message", [
    ({"target": "flops"}, "'macs' or 'params'"),
    ({"ratio": 0.0}, "fraction to keep"),
    ({"ratio": 1.5}, "fraction to keep"),
    ({"importance": "taylor"}, "unknown importance"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_resnet8(), torch.randn(2, 1, 28, 28), **kwargs)


def test_model_without_fc_keeps_its_classifier():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                                          nn.Conv2d(32, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
            self.head = nn.Linear(32, 5)

        def forward(self, x):
            return self.head(self.features(x).mean((2, 3)))

    model = Net().eval()
    prune_model(model, torch.randn(2, 1, 16, 16), ratio=0.5)
    assert model.head.out_features == 5
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 5)
