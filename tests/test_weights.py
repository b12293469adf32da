"""compress.weights: every usual checkpoint form loads to the same model; every bad file is one clear error."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from compress.io import CheckpointError, save_model
from compress.registry import create_model
from compress.weights import load_weights, read_state_dict


def _trained(num_classes: int = 5) -> nn.Module:
    torch.manual_seed(0)
    model = create_model("resnet8", num_classes=num_classes, in_channels=3)
    model.train()(torch.randn(4, 3, 16, 16))  # BN statistics off their defaults
    for p in model.parameters():              # and weights no fresh model has
        p.data.add_(torch.randn_like(p) * 0.1)
    return model.eval()


def _fresh(num_classes: int = 5, in_channels: int = 3) -> nn.Module:
    torch.manual_seed(1)
    return create_model("resnet8", num_classes=num_classes, in_channels=in_channels).eval()


def _same(a: nn.Module, b: nn.Module) -> None:
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def _save_forms(model: nn.Module, tmp_path):
    sd = model.state_dict()
    forms = {
        "plain.pt": sd,
        "dataparallel.pt": nn.DataParallel(model).state_dict(),
        "compiled.pt": torch.compile(model).state_dict(),               # compile is lazy: no compiler runs
        "ddp_compiled.pt": {"module._orig_mod." + k: v for k, v in sd.items()},
        "lightning.ckpt": {"epoch": 3, "state_dict": {"model." + k: v for k, v in sd.items()}},
        "checkpoint.pth": {"model": sd, "optimizer": {"state": {}, "param_groups": []}, "epoch": 90},
        "ema.pth": {"model": {k: torch.zeros_like(v) for k, v in sd.items()}, "model_ema": sd},
        "swa.pt": {"n_averaged": torch.tensor(5), **{"module." + k: v for k, v in sd.items()}},
    }
    for name, obj in forms.items():
        torch.save(obj, tmp_path / name)
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "weights.safetensors"))
    save_model(model, tmp_path / "model.pt", name="resnet8", num_classes=5, in_channels=3)
    return [*forms, "weights.safetensors", "model.pt"]


def test_every_usual_form_loads_to_the_same_model(tmp_path):
    model = _trained()
    for name in _save_forms(model, tmp_path):
        fresh = _fresh()
        info = load_weights(fresh, tmp_path / name, num_classes=5)
        _same(fresh, model)
        assert info["reinitialised"] == []
    assert read_state_dict(tmp_path / "ema.pth")[1]["format"] == "checkpoint['model_ema']"  # EMA wins


def test_a_model_whose_own_layers_are_called_model_keeps_its_keys(tmp_path):
    class Wrapper(nn.Module):
        def __init__(self):
            super().__init__()
            self.model = nn.Linear(4, 3)

        def forward(self, x):
            return self.model(x)

    torch.manual_seed(0)
    src, dst = Wrapper(), Wrapper()
    torch.save(src.state_dict(), tmp_path / "w.pt")
    load_weights(dst, tmp_path / "w.pt", num_classes=3)
    torch.testing.assert_close(dst.model.weight, src.model.weight)


def test_a_pruned_compress_model_loads_with_its_shapes(tmp_path):
    import torch_pruning as tp

    model = _trained()
    pruner = tp.pruner.MetaPruner(model, torch.randn(1, 3, 16, 16), importance=tp.importance.MagnitudeImportance(p=1),
                                  pruning_ratio=0.5, ignored_layers=[model.fc])
    pruner.step()
    save_model(model, tmp_path / "pruned.pt", name="resnet8", num_classes=5, in_channels=3)
    fresh = _fresh()
    load_weights(fresh, tmp_path / "pruned.pt", num_classes=5)
    _same(fresh, model)


def test_class_count_differs(tmp_path):
    model = _trained(num_classes=5)
    torch.save(model.state_dict(), tmp_path / "w.pt")
    with pytest.raises(CheckpointError, match=r"classify 5 classes and the data has 3 .*reinit_classifier: true"):
        load_weights(_fresh(3), tmp_path / "w.pt", num_classes=3)
    fresh = _fresh(3)
    head_before = fresh.fc.weight.clone()
    info = load_weights(fresh, tmp_path / "w.pt", num_classes=3, reinit_classifier=True)
    assert info["reinitialised"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(fresh.fc.weight, head_before)              # the head kept its fresh init
    torch.testing.assert_close(fresh.stem[0].weight, model.stem[0].weight)  # everything else loaded


def test_keys_that_do_not_fit_are_named(tmp_path):
    torch.save(create_model("resnet20", num_classes=5, in_channels=3).state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"weights do not fit resnet8: \d+ unexpected \(stages\.0\.1\."):
        load_weights(_fresh(), tmp_path / "other.pt", num_classes=5, model_name="resnet8")
    sd = _trained().state_dict()
    del sd["stem.1.weight"]
    sd["extra.weight"] = torch.zeros(1)
    torch.save(sd, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointError, match=r"1 missing \(stem\.1\.weight\); 1 unexpected \(extra\.weight\)"):
        load_weights(_fresh(), tmp_path / "mixed.pt", num_classes=5)
    torch.save(_trained().state_dict(), tmp_path / "rgb.pt")
    with pytest.raises(CheckpointError, match=r"first shape mismatch stem\.0\.weight: file \[16, 3, 3, 3\] vs "
                                              r"model \[16, 1, 3, 3\]"):
        load_weights(_fresh(in_channels=1), tmp_path / "rgb.pt", num_classes=5)


@pytest.mark.parametrize("case, message", [
    ("missing", "no such weights file"),
    ("directory", "not a file"),
    ("pickle", "refused: the weights file holds pickled Python objects"),
    ("corrupt", "not a readable weights file"),
    ("empty", "not a readable weights file"),
    ("bad_safetensors", "not a readable safetensors file"),
    ("truncated_safetensors", "not a readable safetensors file"),
    ("no_weights", "no weights found: expected a state_dict"),
    ("nan", "hold NaN or inf"),
])
def test_bad_weights_files(tmp_path, case, message):
    path = tmp_path / ("w.safetensors" if "safetensors" in case else "w.pt")
    sd = _trained().state_dict()
    if case == "directory":
        path.mkdir()
    elif case == "pickle":
        torch.save(_trained(), path)                  # a whole module: needs pickle
    elif case == "corrupt":
        torch.save(sd, path)
        path.write_bytes(path.read_bytes()[:200])
    elif case == "empty":
        path.write_bytes(b"")
    elif case == "bad_safetensors":
        path.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}......")
    elif case == "truncated_safetensors":
        save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
        path.write_bytes(path.read_bytes()[:-100])
    elif case == "no_weights":
        torch.save({"epoch": 3, "optimizer": {"lr": 0.1}}, path)
    elif case == "nan":
        sd["fc.weight"][0, 0] = float("nan")
        torch.save(sd, path)
    with pytest.raises(CheckpointError, match=message) as err:
        load_weights(_fresh(), path, num_classes=5)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_unreadable_file(tmp_path):
    import os

    if os.geteuid() == 0:
        pytest.skip("root reads any file")
    path = tmp_path / "w.pt"
    torch.save(_trained().state_dict(), path)
    path.chmod(0)
    with pytest.raises(CheckpointError, match="permission denied"):
        load_weights(_fresh(), path, num_classes=5)


def test_fine_tuning_starts_from_the_weights_and_the_key_follows_the_file(tmp_path):
    from types import SimpleNamespace

    from compress.config import PipelineConfig, TrainStage
    from compress.pipeline import stage_key
    from compress.weights import start_from

    model = _trained(num_classes=5)
    torch.save({"state_dict": model.state_dict()}, tmp_path / "w.pt")
    cfg = TrainStage(type="train", model="resnet8", weights="w.pt", reinit_classifier=True)
    ctx = SimpleNamespace(base_dir=tmp_path, data=SimpleNamespace(num_classes=3), log=lambda m: None, stage_name="t")
    fresh = _fresh(3)
    info = start_from(fresh, cfg, ctx)
    assert info["start_from"]["reinitialised"] == ["fc.weight", "fc.bias"]
    torch.testing.assert_close(fresh.stem[0].weight, model.stem[0].weight)
    assert start_from(_fresh(3), TrainStage(type="train", model="resnet8"), ctx) == {}
    with pytest.raises(ValueError, match="reinit_classifier applies to weights"):
        TrainStage(type="train", model="resnet8", reinit_classifier=True)
    # the weights file's bytes are in the cache key; without weights the key is what it was before
    pipe = PipelineConfig(name="p", stages={"t": cfg})
    key = stage_key(pipe, "t", [], "fp", tmp_path)
    torch.save({"state_dict": _trained(num_classes=3).state_dict()}, tmp_path / "w.pt")
    assert stage_key(pipe, "t", [], "fp", tmp_path) != key
    plain = TrainStage(type="train", model="resnet8")
    assert "weights" not in plain.model_dump() and "reinit_classifier" not in plain.model_dump()
