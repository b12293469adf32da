"""Structured pruning: one model of every family, pruned to half its MACs, must stay a working,
savable, exportable model of the same task."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from compress.io import load_model, save_model
from compress.registry import count_macs, create_model
from compress.prune import bn_l1, prune_model

FAMILIES = ["resnet20", "resnet18_cifar", "mobilenetv2_x0_5", "mobilenetv3_small", "shufflenetv2_x0_5"]
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
    ({"target": "flops"}, "'macs' or 'params' or 'latency'"),
    ({"ratio": 0.0}, "fraction to keep"),
    ({"ratio": 1.5}, "fraction to keep"),
    ({"importance": "magnitude"}, "unknown importance"),
    ({"importance": "taylor"}, "give gradient_fn"),
    ({"target": "latency", "latency_ms": 1.0}, "needs latency_fn"),
])
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        prune_model(_resnet8(), torch.randn(2, 1, 28, 28), **kwargs)


def test_bn_scale_needs_batchnorm():
    model = nn.Sequential(nn.Conv2d(1, 16, 3), nn.ReLU(), nn.Conv2d(16, 16, 3), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="has no BatchNorm layer"):
        prune_model(model, torch.randn(2, 1, 12, 12), importance="bn_scale")


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


# --- criteria that look beyond the weights: taylor (gradients) and bn_scale (network slimming) ------


CRITERIA = ["taylor", "bn_scale"]
SMALL_FAMILIES = ["resnet8", "resnet18_cifar", "mobilenetv2_x0_5", "mobilenetv3_small", "shufflenetv2_x0_5"]


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", SMALL_FAMILIES)
def test_criterion_on_every_family(name, criterion, tmp_path):
    """Prune with the criterion, then the result must run, train, save, reload and export exactly."""
    from compress.onnx_export import check_parity, export_onnx

    torch.manual_seed(0)
    model = _like_trained(create_model(name, num_classes=10, in_channels=1))
    before = {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    x, y = torch.randn(8, 1, 16, 16), torch.arange(8)
    calls = []

    def gradients(m):
        calls.append(m.training)
        nn.functional.cross_entropy(m(x), y).backward()

    result = prune_model(model, x, ratio=0.6, importance=criterion, round_to=4, iterative_steps=2,
                         gradient_fn=gradients if criterion == "taylor" else None)
    assert 0.3 * result["macs_before"] <= result["macs_after"] <= 0.6 * result["macs_before"]
    assert result["macs_after"] == count_macs(model, (1, 16, 16))
    if criterion == "taylor":  # once per round that prunes, with BN statistics left alone (eval mode)
        assert calls == [False, False]
    assert all(p.grad is None for p in model.parameters())  # no stale gradients left on the pruned model

    changed = 0
    for n, m in model.named_modules():
        if isinstance(m, nn.Conv2d) and m.out_channels != before[n]:
            changed += 1
            assert m.out_channels % 4 == 0 and m.out_channels > 0, n
            assert m.groups in (1, m.out_channels), n
    assert changed > 0
    rows = {r["name"]: r for r in result["layers"]}
    assert {n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))} == set(rows)
    assert all(rows[n]["out_before"] == before[n] for n in before)
    assert all(rows[n]["out_after"] == m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d))
    assert 0 < sum(r["macs_after"] for r in rows.values()) <= result["macs_after"]

    with torch.no_grad():
        out = model(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()
    loaded = load_model(save_model(model, tmp_path / "m.pt", name=name, num_classes=10, in_channels=1)).eval()
    assert {n: m.out_channels for n, m in loaded.named_modules() if isinstance(m, nn.Conv2d)} == \
        {n: m.out_channels for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), out, rtol=0, atol=0)
    parity = check_parity(model, export_onnx(model, tmp_path / "m.onnx", (1, 16, 16)), x)
    assert out.abs().max() > 1e-2 and parity["max_abs_diff"] < 1e-4 and parity["top1_agreement"] == 1.0


class TwoConv(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x):
        x = nn.functional.relu(self.bn1(self.conv1(x)))
        return self.fc(nn.functional.relu(self.bn2(self.conv2(x))).mean((2, 3)))


def _two_conv(**prune_kwargs) -> tuple[nn.Module, dict]:
    torch.manual_seed(0)
    model = TwoConv().eval()
    x, y = torch.randn(8, 1, 12, 12), torch.arange(8) % 4
    with torch.no_grad():
        model.conv2.weight[8:] *= 10  # channels 8-15 of conv2 have the largest weights...
        for key, value in prune_kwargs.pop("setup", {}).items():
            getattr(model, key.split(".")[0]).weight[(slice(None), slice(8, None)) if "fc" in key
                                                     else slice(8, None)] = value
    prune_model(model, x, ratio=0.6, round_to=1, iterative_steps=1,
                gradient_fn=lambda m: nn.functional.cross_entropy(m(x), y).backward(), **prune_kwargs)
    assert model.conv2.out_channels < 16
    return model


def test_taylor_ranks_by_gradient_not_by_magnitude():
    """...but the classifier ignores them: their gradient, and so their Taylor score, is zero."""
    taylor = _two_conv(importance="taylor", setup={"fc": 0.0})
    assert (taylor.fc.weight.abs().sum(0) > 0).sum() == 8  # every channel the loss depends on was kept
    l1 = _two_conv(importance="l1", setup={"fc": 0.0})
    assert (l1.fc.weight.abs().sum(0) > 0).sum() < 8  # magnitude kept the big, useless ones instead
    random = _two_conv(importance="random", setup={"fc": 0.0})
    assert not torch.equal(random.conv2.weight, taylor.conv2.weight)


def test_bn_scale_prunes_the_smallest_bn_scales():
    bn_scale = _two_conv(importance="bn_scale", setup={"bn2": 0.01})
    assert (bn_scale.bn2.weight < 0.1).sum() == 8 - (16 - bn_scale.conv2.out_channels)  # only tiny ones went
    l1 = _two_conv(importance="l1", setup={"bn2": 0.01})
    assert (l1.bn2.weight < 0.1).sum() > (bn_scale.bn2.weight < 0.1).sum()


def test_sparsity_penalty_shrinks_bn_scales():
    """Network slimming's L1 term, through fit's penalty hook, against the same training without it."""
    from compress.config import DataConfig, OptimConfig
    from compress.data import build_data
    from compress.training import fit

    data = build_data(DataConfig(dataset="synthetic", batch_size=8, val_size=16,
                                 synthetic={"num_train": 96, "num_test": 16, "image_size": 16}), "cpu", seed=0)

    def mean_scale(penalty) -> float:
        torch.manual_seed(0)
        model = create_model("resnet8", num_classes=data.num_classes, in_channels=1)
        fit(model, data, OptimConfig(lr=0.05, schedule="constant"), 1, device=torch.device("cpu"), progress=False,
            log=lambda m: None, penalty=penalty)
        return bn_l1(model).item() / sum(m.num_features for m in model.modules() if isinstance(m, nn.BatchNorm2d))

    plain, sparse = mean_scale(None), mean_scale(lambda m: 0.1 * bn_l1(m))
    assert sparse < 0.8 * plain


# --- latency as the target --------------------------------------------------------------------------


def test_latency_target_is_met_with_a_given_clock():
    """Any clock works: here one that reads the MACs (1 ms per million), so the test is exact."""
    model, reads = _resnet8(), []

    def clock(m):
        reads.append(count_macs(m, (1, 16, 16)))
        return reads[-1] / 1e6

    x = torch.randn(2, 1, 16, 16)
    start = count_macs(model, (1, 16, 16)) / 1e6
    result = prune_model(model, x, target="latency", latency_ms=0.5 * start, latency_fn=clock, iterative_steps=2,
                         round_to=1)
    assert result["latency_ms_before"] == pytest.approx(start)
    assert result["latency_ms_after"] <= 0.5 * start
    assert result["latency_ms_after"] == pytest.approx(count_macs(model, (1, 16, 16)) / 1e6)
    assert len(reads) > 3 and reads == sorted(reads, reverse=True)  # measured after every pruning step
    assert [h["round"] for h in result["history"]] == [1, 2] and all("latency_ms" in h for h in result["history"])
    assert result["history"][0]["latency_ms"] > result["history"][1]["latency_ms"]


def test_unreachable_latency_raises():
    floor = lambda m: 0.2 + count_macs(m, (1, 16, 16)) / 1e6  # noqa: E731 (fixed overheads: a latency floor)
    with pytest.raises(ValueError, match=r"cannot prune to 0.1 ms: the latency stopped at (\S+) ms \(") as info:
        prune_model(_resnet8(), torch.randn(2, 1, 16, 16), target="latency", latency_ms=0.1, latency_fn=floor)
    assert float(re.search(r"stopped at (\S+) ms", str(info.value)).group(1)) > 0.2  # the floor, plus what is left


@pytest.mark.parametrize("runtime", ["torch", "onnxruntime"])
def test_latency_probe_times_the_model(runtime):
    from compress.prune import latency_probe

    model = _resnet8().train()
    ms = latency_probe(runtime, (1, 16, 16), warmup=1, iters=3)(model)
    assert 0 < ms < 1000
    assert model.training  # the probe leaves the model's mode alone


# --- the stage: sparsity, rounds with fine-tuning, the layer report ---------------------------------


@pytest.fixture(scope="module")
def stage_env(tmp_path_factory):
    """Tiny synthetic data and a saved resnet8 parent that is also its own teacher."""
    from compress.config import DataConfig
    from compress.context import Artifact
    from compress.data import build_data

    data = build_data(DataConfig(dataset="synthetic", batch_size=16, val_size=32,
                                 synthetic={"num_train": 128, "num_test": 16, "image_size": 16}), "cpu", seed=0)
    torch.manual_seed(0)
    parent = _like_trained(create_model("resnet8", num_classes=data.num_classes, in_channels=1))
    path = save_model(parent, tmp_path_factory.mktemp("parent") / "model.pt", name="resnet8",
                      num_classes=data.num_classes, in_channels=1)
    return data, Artifact(name="parent", stage="train", parent=None, model="resnet8", files={"model": str(path)})


def run_stage(stage_env, tmp_path, **fields):
    from compress.config import PruneStage
    from compress.context import Context
    from compress.stages import prune

    data, parent = stage_env
    cfg = PruneStage.model_validate({"type": "prune", "from": "parent", "finetune_epochs": 1, "lr": 0.01,
                                     **fields})
    ctx = Context(run_dir=tmp_path, stage_dir=tmp_path / "pruned", stage_name="pruned", device=torch.device("cpu"),
                  seed=0, data=data, inputs=[parent], teachers=[parent], artifacts={"parent": parent},
                  log=lambda m: None, progress=False)
    return prune.run(cfg, ctx)


@pytest.fixture
def fit_calls(monkeypatch):
    """Every training.fit call the stage makes: (desc, epochs, MACs of the model, penalty given)."""
    import compress.training

    calls, real_fit = [], compress.training.fit

    def recording_fit(model, data, opts, epochs, **kw):
        calls.append((kw["desc"], epochs, count_macs(model, (1, 16, 16)), kw.get("penalty") is not None))
        return real_fit(model, data, opts, epochs, **kw)

    monkeypatch.setattr(compress.training, "fit", recording_fit)
    return calls


def test_stage_fine_tunes_between_rounds(stage_env, tmp_path, fit_calls):
    art = run_stage(stage_env, tmp_path, target_macs=0.5, iterative_steps=3, finetune_between_epochs=2,
                    importance="taylor", taylor_batches=2, round_to=2)
    # After rounds 1 and 2 (each on a smaller model), then the final fine-tune; none after round 3.
    assert [(desc, epochs) for desc, epochs, _, _ in fit_calls] == [
        ("pruned (round1)", 2), ("pruned (round2)", 2), ("pruned", 1)]
    macs = [m for _, _, m, _ in fit_calls]
    assert macs[0] > macs[1] > macs[2] == art.macs
    info = art.metrics["prune"]
    assert [h["macs"] for h in info["history"]][:2] == macs[:2] and info["importance"] == "taylor"
    assert art.macs <= 0.5 * info["macs_before"]


def test_stage_sparsity_phase_then_bn_scale(stage_env, tmp_path, fit_calls):
    art = run_stage(stage_env, tmp_path, target_macs=0.6, iterative_steps=1, importance="bn_scale",
                    sparsity={"epochs": 1, "strength": 0.01}, finetune_epochs=0)
    assert [(desc, penalty) for desc, _, _, penalty in fit_calls] == [("pruned (sparsity)", True)]
    sparsity = art.metrics["prune"]["sparsity"]
    assert sparsity["bn_scales_after"]["mean_abs"] < sparsity["bn_scales_before"]["mean_abs"]
    assert art.macs <= 0.6 * art.metrics["prune"]["macs_before"]


def test_stage_writes_the_layer_report(stage_env, tmp_path):
    import json

    art = run_stage(stage_env, tmp_path, target_params=0.5, iterative_steps=1, finetune_epochs=0, round_to=4)
    assert art.files["layers_json"] == str(tmp_path / "pruned" / "layers.json")
    rows = json.loads(Path(art.files["layers_json"]).read_text())["layers"]
    model = load_model(art.files["model"])
    convs = {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    assert [r["name"] for r in rows] == [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    for r in rows:
        if r["name"] in convs:
            assert r["out_after"] == convs[r["name"]].out_channels and r["in_after"] == convs[r["name"]].in_channels
            assert r["out_after"] == r["out_before"] or r["out_after"] % 4 == 0
    assert any(r["out_after"] < r["out_before"] for r in rows)
    assert sum(r["macs_after"] for r in rows) < sum(r["macs_before"] for r in rows)
    table = Path(art.files["layers"]).read_text()
    assert "| `stages.0.0.conv1` | Conv2d |" in table and table.count("\n| `") == len(rows)
    assert "layers" not in art.metrics["prune"]  # the table lives in its file, not in every manifest


def test_stage_latency_target_on_onnxruntime(stage_env, tmp_path):
    """A target the unpruned model already meets: nothing is pruned, and the measurement is recorded."""
    art = run_stage(stage_env, tmp_path, target_latency_ms=1000, finetune_epochs=0, iterative_steps=1)
    info = art.metrics["prune"]
    assert info["macs_after"] == info["macs_before"] and 0 < info["latency_ms_after"] <= 1000
    assert "onnxruntime, batch 1" in info["latency"]


def test_stage_unreachable_latency_is_one_clear_error(stage_env, tmp_path, monkeypatch):
    from compress.context import StageError
    from compress.stages import prune

    monkeypatch.setattr(prune, "latency_probe", lambda runtime, shape, **kw: lambda m: 5.0)  # a floor
    with pytest.raises(StageError) as info:
        run_stage(stage_env, tmp_path, target_latency_ms=1, latency_runtime="torch", latency_batch=4,
                  iterative_steps=1)
    message = str(info.value)
    assert message.startswith("stage 'pruned': cannot prune to 1 ms: the latency stopped at 5 ms")
    assert "(latency on torch, batch 4" in message and "\n" not in message
    assert not (tmp_path / "pruned" / "model.pt").exists()


# --- the stage's config -----------------------------------------------------------------------------


def _load_stage(tmp_path, fields: str):
    from compress.config import load

    path = tmp_path / "p.yaml"
    path.write_text("name: p\nstages:\n  t: {type: train, model: resnet8}\n"
                    f"  pruned: {{type: prune, from: t, {fields}}}\n")
    return load(path).stages["pruned"]


def test_config_takes_every_criterion_and_schedule(tmp_path):
    stage = _load_stage(tmp_path, "target_latency_ms: 0.3, latency_runtime: torch, importance: taylor, "
                                  "taylor_batches: 2, iterative_steps: 4, finetune_between_epochs: 1")
    assert (stage.target_latency_ms, stage.latency_runtime, stage.latency_batch) == (0.3, "torch", 1)
    assert (stage.importance, stage.finetune_between_epochs, stage.iterative_steps) == ("taylor", 1, 4)
    stage = _load_stage(tmp_path, "target_macs: 0.5, importance: bn_scale, sparsity: {epochs: 2}")
    assert (stage.sparsity.epochs, stage.sparsity.strength) == (2, 1e-2)


@pytest.mark.parametrize("fields, message", [
    ("finetune_epochs: 1", "stages.pruned: give exactly one of target_macs, target_params, target_latency_ms"),
    ("target_macs: 0.5, target_latency_ms: 2", "(got target_macs, target_latency_ms)"),
    ("target_macs: 0.5, latency_runtime: torch", "latency_runtime and latency_batch apply to target_latency_ms"),
    ("target_macs: 0.5, sparsity: {epochs: 1}", "sparsity applies to importance: bn_scale, but importance is l1"),
    ("target_macs: 0.5, taylor_batches: 3", "taylor_batches applies to importance: taylor"),
    ("target_macs: 0.5, importance: bn_scale, sparsity: {epoch: 1}", "unknown key 'epoch'; did you mean 'epochs'?"),
    ("target_macs: 0.5, importance: hessian", "'taylor' or 'bn_scale', got 'hessian'"),
    ("target_latency_ms: 0", "target_latency_ms: expected greater than 0"),
])
def test_config_errors_are_one_line(tmp_path, fields, message):
    from compress.config import ConfigError

    with pytest.raises(ConfigError) as info:
        _load_stage(tmp_path, fields)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_prune_criteria_pipeline_is_valid():
    from compress.config import load

    cfg = load(Path(__file__).parent.parent / "pipelines" / "prune-criteria.yaml")
    prunes = {name: st for name, st in cfg.stages.items() if st.type == "prune"}
    assert {st.importance for st in prunes.values()} >= {"l1", "taylor", "bn_scale"}
    assert any(st.finetune_between_epochs for st in prunes.values())
    assert any(st.target_latency_ms for st in prunes.values())
