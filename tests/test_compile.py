"""`compile: true` trains through torch.compile (inductor on CPU here) and hands back a plain module."""

import pytest
import torch
from torch import nn

from compress.config import DataConfig, OptimConfig
from compress.data import build_data
from compress.training import fit


def test_compiled_training_matches_eager_and_returns_the_plain_module():
    data = build_data(DataConfig(dataset="synthetic", batch_size=32, val_size=32,
                                 synthetic={"num_train": 256, "num_test": 32, "image_size": 8}), "cpu", seed=0)
    runs = {}
    for compiled in (False, True):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                              nn.Flatten(), nn.Linear(8, 4))
        metrics = fit(model, data, OptimConfig(compile=compiled, lr=0.05), 3, device=torch.device("cpu"),
                      progress=False, log=lambda m: None)
        runs[compiled] = model, [h["loss"] for h in metrics["history"]]
    model, losses = runs[True]
    assert type(model) is nn.Sequential and not any(k.startswith("_orig_mod") for k in model.state_dict())
    assert losses[-1] < losses[0]  # it learned ...
    assert losses == pytest.approx(runs[False][1], rel=1e-4)  # ... what eager mode learns
    for (name, a), b in zip(model.state_dict().items(), runs[False][0].state_dict().values()):
        if a.is_floating_point():
            torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)
