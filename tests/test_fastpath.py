"""The CPU fast path (compress.fastpath): `auto` decides from a probe, explicit settings win,
bf16 only on chips that have it, the probe is cached and harmless, and fit records its choice."""

import json

import pytest
import torch
from torch import nn

from compress import fastpath
from compress.config import OptimConfig

PLAIN = {"avx2", "fma"}                       # this EPYC: no native bf16
AMX = {"avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"}


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    path = tmp_path / "fastpath.json"
    monkeypatch.setenv("COMPRESS_FAST_PATH_CACHE", str(path))
    return path


def tiny() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Dropout(0.2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3))


class StandIn:
    """A probe with fixed images/s per mode; remembers which modes it was asked for."""

    def __init__(self, **rates):
        self.rates, self.calls = rates, []

    def __call__(self, model, input_shape, batch, modes, train=True):
        self.calls.append(tuple(modes))
        return {m: self.rates[m] for m in modes}


def choose(setting="auto", flags=PLAIN, measure=None, amp=True, model=None, log=None):
    return fastpath.choose(setting, model or tiny(), (1, 8, 8), 16, device="cpu", amp=amp, flags=flags,
                           measure=measure or StandIn(fp32=100, channels_last=100, bf16=100, bf16_channels_last=100),
                           log=log or (lambda m: None))


@pytest.mark.parametrize("rates, expected", [
    ({"fp32": 100, "channels_last": 180}, "channels_last"),
    ({"fp32": 100, "channels_last": 60}, "fp32"),
    ({"fp32": 100, "channels_last": 103}, "fp32"),     # within the margin: not worth a change of numerics
])
def test_auto_picks_what_the_probe_measured_faster(rates, expected):
    probe = StandIn(**rates)
    path = choose(measure=probe)
    assert path.mode == expected and path.setting == "auto"
    assert path.images_per_s == rates and probe.calls == [("fp32", "channels_last")]


def test_auto_with_native_bf16_probes_all_four_and_takes_the_fastest():
    probe = StandIn(fp32=450, channels_last=520, bf16=691, bf16_channels_last=863)
    path = choose(flags=AMX, measure=probe)
    assert probe.calls == [fastpath.MODES]
    assert path.mode == "bf16_channels_last" and path.autocast == "bf16" and path.channels_last
    mobilenet = StandIn(fp32=497, channels_last=1009, bf16=492, bf16_channels_last=636)
    assert choose(flags=AMX, measure=mobilenet, model=nn.Sequential(tiny(), nn.ReLU())).mode == "channels_last"


@pytest.mark.parametrize("flags, amp", [(PLAIN, True), (AMX, False)], ids=["emulated bf16", "amp off"])
def test_auto_never_picks_bf16_without_native_support_or_amp(flags, amp):
    probe = StandIn(fp32=100, channels_last=90, bf16=1000, bf16_channels_last=2000)
    path = choose(flags=flags, amp=amp, measure=probe)
    assert path.autocast is None and path.mode == "fp32"
    assert all(not m.startswith("bf16") for m in probe.calls[0])
    assert "bf16 not tried" in path.reason


@pytest.mark.parametrize("setting, mode", [("off", "fp32"), ("channels_last", "channels_last"),
                                           ("bf16", "bf16"), ("bf16_channels_last", "bf16_channels_last")])
def test_explicit_settings_override_the_probe(setting, mode):
    probe = StandIn(fp32=1, channels_last=1000)
    path = choose(setting, flags=AMX, measure=probe)
    assert path.mode == mode and path.setting == setting and probe.calls == []


def test_explicit_bf16_on_a_chip_without_it_runs_but_says_so():
    lines = []
    path = choose("bf16", flags=PLAIN, log=lines.append)
    assert path.autocast == "bf16" and "emulated" in path.reason
    assert len(lines) == 1 and "no native bf16" in lines[0]


def test_native_bf16_is_read_from_the_cpu_flags():
    assert fastpath.native_bf16(AMX) and fastpath.native_bf16({"avx512_bf16"}) and fastpath.native_bf16({"amx_bf16"})
    assert not fastpath.native_bf16(PLAIN) and not fastpath.native_bf16({"avx512f", "avx512bw"})
    assert fastpath.isa(AMX) == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]


def test_short_runs_are_not_probed_unless_the_cache_knows():
    probe = StandIn(fp32=100, channels_last=200)
    short = fastpath.choose("auto", tiny(), (1, 8, 8), 16, device="cpu", flags=PLAIN, measure=probe, steps=20)
    assert short.mode == "fp32" and "too few" in short.reason and probe.calls == []
    choose(measure=probe)                                                     # a long run measures and caches
    again = fastpath.choose("auto", tiny(), (1, 8, 8), 16, device="cpu", flags=PLAIN, measure=probe, steps=20)
    assert again.mode == "channels_last" and len(probe.calls) == 1


def test_probe_is_cached_per_machine_and_model(cache):
    probe = StandIn(fp32=100, channels_last=200, bf16=300, bf16_channels_last=50)
    assert choose(measure=probe).mode == "channels_last"
    again = choose(measure=probe)
    assert again.mode == "channels_last" and again.reason.startswith("cached probe") and len(probe.calls) == 1
    choose(measure=probe, model=nn.Sequential(tiny(), nn.Linear(3, 3)))     # another model: measured
    choose(measure=probe, flags=AMX)                                        # another machine: measured
    assert len(probe.calls) == 3
    stored = json.loads(cache.read_text())
    assert stored["format"] == fastpath.CACHE_FORMAT and len(stored["machines"]) == 2


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"format": "other", "machines": {}}',
                                     '{"format": "compress.fastpath/1", "machines": {"x": 3}}'])
def test_damaged_cache_is_ignored_and_rewritten(cache, content):
    cache.write_text(content)
    probe, lines = StandIn(fp32=100, channels_last=200), []
    assert choose(measure=probe, log=lines.append).mode == "channels_last" and len(probe.calls) == 1
    assert json.loads(cache.read_text())["format"] == fastpath.CACHE_FORMAT
    assert choose(measure=probe).reason.startswith("cached") and len(probe.calls) == 1


def test_unwritable_cache_does_not_fail_training(tmp_path, monkeypatch):
    blocker = tmp_path / "file"
    blocker.write_text("")
    monkeypatch.setenv("COMPRESS_FAST_PATH_CACHE", str(blocker / "sub" / "fastpath.json"))
    lines = []
    assert choose(measure=StandIn(fp32=100, channels_last=200), log=lines.append).mode == "channels_last"
    assert any("could not write" in line for line in lines)


def test_real_probe_leaves_model_and_rng_alone():
    model = tiny()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    rates = fastpath.probe(model, (1, 8, 8), 8, fastpath.MODES, warmup=1, steps=1)
    assert torch.equal(torch.rand(3), expected)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert set(rates) == set(fastpath.MODES) and all(r > 0 for r in rates.values())
    infer = fastpath.probe(model, (1, 8, 8), 8, ("fp32", "channels_last"), train=False, warmup=1, steps=1)
    assert set(infer) == {"fp32", "channels_last"}


def test_fast_path_applies_memory_format_and_autocast():
    path = fastpath.fixed("bf16_channels_last")
    model = path.model(nn.Conv2d(2, 4, 3))
    x = path.input(torch.randn(2, 2, 5, 5))
    assert model.weight.is_contiguous(memory_format=torch.channels_last)
    assert x.is_contiguous(memory_format=torch.channels_last)
    with path.context():
        assert model(x).dtype == torch.bfloat16
    with fastpath.fixed("fp32").context():
        assert model(x).dtype == torch.float32
    assert path.record()["mode"] == "bf16_channels_last"


def test_config_key_defaults_and_bad_values():
    assert OptimConfig().cpu_fast_path == "auto"
    assert "cpu_fast_path" not in OptimConfig().model_dump()     # cache keys of existing configs unchanged
    assert OptimConfig(cpu_fast_path="off").model_dump()["cpu_fast_path"] == "off"
    assert OptimConfig(cpu_fast_path=False).cpu_fast_path == "off"        # YAML reads a bare `off` as false
    with pytest.raises(ValueError, match="cpu_fast_path"):
        OptimConfig(cpu_fast_path="fp16")
    with pytest.raises(ValueError, match="amp is false"):
        OptimConfig(cpu_fast_path="bf16", amp=False)
    with pytest.raises(ValueError, match="unknown cpu_fast_path"):
        fastpath.choose("fast", tiny(), (1, 8, 8), 4, device="cpu")


def test_torch_benchmark_runner_runs_through_a_fast_path():
    from compress.runtime import TorchRunner

    model, x = tiny().eval(), torch.randn(4, 1, 8, 8)
    reference = TorchRunner(nn.Sequential(*[m for m in tiny().eval()]))(x)
    runner = TorchRunner(model)
    runner.use(fastpath.fixed("bf16_channels_last"))
    assert model[0].weight.is_contiguous(memory_format=torch.channels_last)
    out = runner(x)
    assert out.dtype == torch.float32 and not torch.equal(out, reference)    # bf16 rounding happened
    assert torch.allclose(out, reference, atol=0.05, rtol=0.05)


# ----------------------------------------------------------------------------- in fit and the pipeline

@pytest.fixture(scope="module")
def data():
    from compress.config import DataConfig
    from compress.data import build_data

    cfg = DataConfig(dataset="synthetic", batch_size=16, val_size=32,
                     synthetic={"num_train": 160, "num_test": 32, "image_size": 8})
    return build_data(cfg, torch.device("cpu"), seed=0)


def test_resume_with_bf16_on_is_bit_exact(data, tmp_path):
    from compress.training import Interrupted, fit
    from tests.test_resume import (
        Net,
        same_weights,
        scramble_rngs,
        sigterm_at,
        without_timing,
    )

    def run(mode, checkpoint=None, model=None):
        model = model or Net()
        metrics = fit(model, data, OptimConfig(lr=0.05, cpu_fast_path=mode), 2, device=torch.device("cpu"),
                      progress=False, log=lambda m: None, checkpoint=checkpoint)
        return model, metrics

    reference, ref_metrics = run("bf16_channels_last")
    assert ref_metrics["fast_path"]["mode"] == "bf16_channels_last"
    assert not same_weights(reference, run("off")[0])       # bf16 autocast really ran
    ckpt, model = tmp_path / "checkpoint.pt", Net()
    handle = sigterm_at(model, 13)
    with pytest.raises(Interrupted):
        run("bf16_channels_last", ckpt, model)
    handle.remove()
    scramble_rngs()
    resumed, metrics = run("bf16_channels_last", ckpt)
    assert same_weights(resumed, reference)
    assert without_timing(metrics) == without_timing(ref_metrics)
    assert all(v.is_contiguous() for v in resumed.state_dict().values())   # saved as plain fp32 NCHW


def test_auto_in_fit_uses_the_probe_and_records_it(data, monkeypatch):
    from compress.training import fit
    from tests.test_resume import Net

    monkeypatch.setattr(fastpath, "probe", StandIn(fp32=100, channels_last=300))
    monkeypatch.setattr(fastpath, "MIN_PROBE_STEPS", 1)       # 1 epoch here is 8 steps
    model = Net()
    metrics = fit(model, data, OptimConfig(lr=0.05), 1, device=torch.device("cpu"), progress=False,
                  log=lambda m: None)
    assert metrics["fast_path"]["mode"] == "channels_last" and metrics["fast_path"]["setting"] == "auto"
    assert metrics["fast_path"]["images_per_s"] == {"fp32": 100, "channels_last": 300}


PIPELINE = """\
name: fast
seed: 0
device: cpu
data:
  dataset: synthetic
  synthetic: {num_train: 96, num_test: 16, num_classes: 4, image_size: 8}
  batch_size: 32
  val_size: 16
stages:
  teacher: {type: train, model: resnet8, epochs: 1, lr: 0.05, cpu_fast_path: channels_last}
  student: {type: distill, from: teacher, model: resnet8, epochs: 1, lr: 0.05, cpu_fast_path: off}
export: {parity_images: 8}
engine: {precisions: [fp32]}
benchmark: {runtimes: [torch], batch_sizes: [1], warmup: 0, iters: 1, cpu_fast_path: channels_last}
"""


def test_manifests_and_report_record_the_fast_path(tmp_path):
    from compress import config
    from compress.pipeline import run_pipeline

    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    cfg = config.load(path, ["report.dir=" + str(tmp_path / "reports")])
    report_dir = run_pipeline(cfg, pipeline_path=path, runs_dir=tmp_path / "runs", log=lambda m: None,
                              progress=False)
    for stage, mode in [("teacher", "channels_last"), ("student", "fp32")]:
        manifest = json.loads((tmp_path / "runs/fast" / stage / "manifest.json").read_text())
        assert manifest["artifact"]["metrics"]["fast_path"]["mode"] == mode
    report = json.loads((report_dir / "report.json").read_text())
    assert report["stages"]["teacher"]["metrics"]["fast_path"]["setting"] == "channels_last"
    assert {r["fast_path"] for r in report["artifacts"] if r["runtime"] == "torch"} == {"channels_last"}
    assert "trained with" in (report_dir / "report.md").read_text()


def test_bad_cpu_fast_path_in_yaml_is_one_line_exit_2(tmp_path):
    import subprocess
    import sys

    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace("cpu_fast_path: off", "cpu_fast_path: turbo"))
    proc = subprocess.run([sys.executable, "-m", "compress", "validate", str(path)], capture_output=True,
                          text=True, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("error:") and "cpu_fast_path" in proc.stderr
    from compress import config

    path.write_text(PIPELINE.replace("cpu_fast_path: off", "cpu_fast_path: bf16, amp: false"))
    with pytest.raises(config.ConfigError, match="amp is false") as err:
        config.load(path)
    assert len(str(err.value).splitlines()) == 1 and "p.yaml" in str(err.value)


def test_a_probe_that_fails_means_fp32_and_nothing_cached(cache):
    def broken(*args, **kwargs):
        raise RuntimeError("cannot copy this model")

    lines = []
    path = choose(measure=broken, log=lines.append)
    assert path.mode == "fp32" and "probe failed" in path.reason and "cannot copy" in lines[0]
    assert not cache.exists()


def test_auto_resumes_in_the_mode_it_started_with(data, tmp_path, monkeypatch, cache):
    from compress.training import Interrupted, fit
    from tests.test_resume import Net, same_weights, sigterm_at, without_timing

    monkeypatch.setattr(fastpath, "MIN_PROBE_STEPS", 1)

    def run(checkpoint=None, model=None):
        model = model or Net()
        metrics = fit(model, data, OptimConfig(lr=0.05), 2, device=torch.device("cpu"), progress=False,
                      log=lambda m: None, checkpoint=checkpoint)
        return model, metrics

    monkeypatch.setattr(fastpath, "probe", StandIn(fp32=100, channels_last=300))
    reference, ref_metrics = run()
    ckpt, model = tmp_path / "checkpoint.pt", Net()
    handle = sigterm_at(model, 13)
    with pytest.raises(Interrupted):
        run(ckpt, model)
    handle.remove()
    cache.unlink()                                   # the probe is gone, and would now say fp32
    monkeypatch.setattr(fastpath, "probe", StandIn(fp32=300, channels_last=100))
    resumed, metrics = run(ckpt)
    assert metrics["fast_path"]["mode"] == "channels_last"
    assert same_weights(resumed, reference)
    assert {**without_timing(metrics), "fast_path": None} == {**without_timing(ref_metrics), "fast_path": None}


def test_the_fast_path_off_benchmark_pipeline_is_the_default_with_only_the_fast_path_off():
    """benchmarks/distill-fastpath-off.yaml times the default pipeline without the fast path: it must not
    drift from pipelines/distill.yaml in anything else (a changed recipe there must be copied here)."""
    from pathlib import Path

    from compress.config import OptimConfig as Optim
    from compress.config import load

    root = Path(__file__).parents[1]
    default, off = load(root / "pipelines/distill.yaml"), load(root / "benchmarks/distill-fastpath-off.yaml")
    assert list(off.stages) == list(default.stages)
    for name, stage in off.stages.items():
        trains = isinstance(stage, Optim) and (stage.type != "quantize" or stage.method == "qat")
        assert stage.cpu_fast_path == ("off" if trains else "auto"), name
        assert stage.model_copy(update={"cpu_fast_path": "auto"}) == default.stages[name], name
    assert off.benchmark.cpu_fast_path == "off"
    assert off.benchmark.model_copy(update={"cpu_fast_path": "auto"}) == default.benchmark
    assert (off.data, off.seed, off.engine) == (default.data, default.seed, default.engine)
