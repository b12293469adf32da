"""Training quality: rotation, random erasing, mixup/CutMix, label smoothing on mixed targets, the EMA
of the weights and the warm-up, from the config down to `fit` (tiny synthetic data, CPU, seconds)."""

from __future__ import annotations

import math
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from compress.config import AugmentConfig, ConfigError, DataConfig, OptimConfig, SyntheticConfig, load
from compress.data import build_data
from compress.data.augment import Mixer, cutmix_box, erase, erasing_boxes, rotate
from compress.ema import EMA
from compress.losses import DKD, KD, DistillLoss
from compress.training import Interrupted, fit, make_scheduler
from tests.test_resume import Net, same_weights, scramble_rngs, sigterm_at, without_timing

CPU = torch.device("cpu")


def synthetic(size=12, val=40, **augment) -> DataConfig:
    syn = SyntheticConfig(num_train=240, num_test=60, num_classes=4, image_size=size)
    return DataConfig(dataset="synthetic", synthetic=syn, val_size=val, batch_size=32,
                      augment=AugmentConfig(crop_padding=0, hflip=False, **augment))


# ---------------------------------------------------------------------------------- rotation

def test_rotation_by_90_degrees_is_rot90_and_turns_counter_clockwise():
    x = torch.rand(3, 2, 7, 7)
    assert torch.allclose(rotate(x, torch.full((3,), 90.0)), torch.rot90(x, 1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, torch.full((3,), -90.0)), torch.rot90(x, -1, (-2, -1)), atol=1e-5)
    assert torch.allclose(rotate(x, torch.zeros(3)), x, atol=1e-6)
    # a non-square image: a pixel 3 right of the centre goes 3 above it (a rotation in pixels, not in [-1, 1])
    x = torch.zeros(2, 1, 9, 15)
    x[:, 0, 4, 10] = 1
    out = rotate(x, torch.tensor([90.0, 180.0]))
    assert (out[0, 0] > 0.5).nonzero().tolist() == [[1, 7]]
    assert (out[1, 0] > 0.5).nonzero().tolist() == [[4, 4]]
    assert torch.allclose(out.sum((1, 2, 3)), torch.ones(2), atol=1e-4)     # moved, not smeared or lost


def test_rotation_in_batches_is_reproducible_bounded_and_off_by_default():
    plain = build_data(synthetic(), CPU, seed=0)
    dm = build_data(synthetic(rotation=30), CPU, seed=0)
    first, again = list(dm.train_batches(1)), list(dm.train_batches(1))
    reference = list(plain.train_batches(1))
    for (x1, y1), (x2, _), (x0, y0) in zip(first, again, reference):
        assert torch.equal(x1, x2) and torch.equal(y1, y0) and x1.shape == x0.shape
    assert not torch.equal(first[0][0], reference[0][0])
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(dm.train_batches(1, augment=False), reference))
    # every image is its unaugmented self turned by at most 30 degrees: the best angle on a 1-degree grid is within
    x_aug, x_plain = first[0][0][:4], reference[0][0][:4]
    mean, std = dm.mean[0], dm.std[0]
    pix_aug, pix_plain = (x_aug * std + mean) * 255, (x_plain * std + mean) * 255
    for a, p in zip(pix_aug, pix_plain):
        angles = torch.arange(-40.0, 40.1, 0.5)
        errors = (rotate(p[None].expand(len(angles), -1, -1, -1), angles) - a).abs().mean((1, 2, 3))
        assert abs(angles[errors.argmin()].item()) <= 30.25 and errors.min() < 0.05 * errors.max()


# ----------------------------------------------------------------------------------- erasing

def test_erase_changes_exactly_its_box_and_only_where_applied():
    x = torch.randn(3, 2, 8, 10)
    boxes = torch.tensor([[1, 0, 5], [2, 0, 3], [3, 8, 4], [4, 10, 2]])   # top, left, height, width of each image
    out = erase(x, boxes, torch.tensor([True, True, False]), 0.0)
    inside = torch.zeros(3, 1, 8, 10, dtype=torch.bool)
    inside[0, :, 1:4, 2:6] = True
    inside[1, :, 0:8, 0:10] = True
    assert torch.equal(out, torch.where(inside, 0.0, x))
    noise = torch.full_like(x, 7.0)
    out = erase(x, boxes, torch.ones(3, dtype=torch.bool), noise)
    assert torch.equal(out[2, :, 5:8, 3:5], noise[2, :, 5:8, 3:5])
    assert (out[2] != x[2]).sum() == 2 * 3 * 2                          # cut at the bottom border


def test_erasing_boxes_fit_and_cover_the_asked_area():
    n, h, w = 20_000, 64, 48
    g = torch.Generator().manual_seed(0)
    lo, hi = 0.05, 0.2
    area = lo + (hi - lo) * torch.rand(n, generator=g, dtype=torch.float64)
    log_ratio = torch.empty(n, dtype=torch.float64).uniform_(math.log(0.3), math.log(1 / 0.3), generator=g)
    top, left, bh, bw = erasing_boxes(area, log_ratio, torch.rand(2, n, generator=g, dtype=torch.float64), h, w)
    assert (top >= 0).all() and (left >= 0).all() and (top + bh <= h).all() and (left + bw <= w).all()
    assert top.min() == 0 and (top + bh).max() == h and left.min() == 0 and (left + bw).max() == w
    fraction = (bh * bw).double() / (h * w)
    unclipped = (bh < h) & (bw < w)
    assert unclipped.float().mean() > 0.9
    assert fraction[unclipped].min() > lo * 0.8 and fraction[unclipped].max() < hi * 1.2
    assert fraction.mean().item() == pytest.approx((lo + hi) / 2, rel=0.08)


@pytest.mark.parametrize("value", ["zero", "random"])
def test_random_erasing_in_batches(value):
    dm = build_data(synthetic(size=16, erasing=0.5, erasing_area=(0.1, 0.3), erasing_value=value), CPU, seed=0)
    plain = build_data(synthetic(size=16), CPU, seed=0)
    erased = areas = 0
    for (xa, ya), (xp, yp) in zip(dm.train_batches(3), plain.train_batches(3)):
        assert torch.equal(ya, yp)
        changed = (xa != xp).any(1)                                   # (B, H, W)
        for c in changed[changed.flatten(1).any(1)]:
            rows, cols = c.any(1).nonzero().flatten(), c.any(0).nonzero().flatten()
            box = c[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
            assert c.sum() == box.numel()                            # one solid rectangle, nothing outside
            erased += 1
            areas += box.numel() / c.numel()
        if value == "zero":
            assert (xa[(xa != xp)] == 0).all()
    assert erased / dm.num_train == pytest.approx(0.5, abs=0.12)    # 200 images, p = 0.5
    assert 0.1 * 0.8 < areas / erased < 0.3
    again = list(dm.train_batches(3))
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(dm.train_batches(3), again))


# ------------------------------------------------------------------------------- mixup / cutmix

def test_mixup_mixes_images_and_labels_by_the_same_lam():
    mixer = Mixer(5, mixup_alpha=0.4, seed=3)
    x, y = torch.randn(6, 2, 4, 4), torch.tensor([0, 1, 2, 3, 4, 0])
    out, target = mixer(x, y, epoch=2, step=7)
    lam, box = mixer.params(2, 7, 4, 4)
    assert box is None and 0 < lam < 1
    assert torch.allclose(out, lam * x + (1 - lam) * x.flip(0))
    expected = lam * F.one_hot(y, 5).float() + (1 - lam) * F.one_hot(y.flip(0), 5).float()
    assert torch.allclose(target, expected) and torch.allclose(target.sum(1), torch.ones(6))
    again = mixer(x, y, epoch=2, step=7)
    assert torch.equal(again[0], out) and torch.equal(again[1], target)   # a function of (seed, epoch, step)
    assert not torch.equal(mixer(x, y, epoch=2, step=8)[0], out)


def test_cutmix_pastes_a_box_whose_area_is_one_minus_lam():
    mixer = Mixer(3, cutmix_alpha=1.0, seed=0)
    h, w = 20, 30
    x, y = torch.randn(4, 3, h, w), torch.tensor([0, 1, 2, 1])
    for step in range(20):
        lam, box = mixer.params(0, step, h, w)
        out, target = mixer(x, y, 0, step)
        if lam == 1.0:
            continue
        top, bottom, left, right = box
        pasted = (out != x).any(1)                                     # (B, H, W)
        assert pasted.float().mean((1, 2)).tolist() == pytest.approx([1 - lam] * 4)
        assert pasted[:, top:bottom, left:right].all()
        assert torch.equal(out[..., top:bottom, left:right], x.flip(0)[..., top:bottom, left:right])
        assert torch.allclose(target, lam * F.one_hot(y, 3) + (1 - lam) * F.one_hot(y.flip(0), 3))
    # the box, where no border cuts it, is (1 - lam) of the image up to rounding
    rng = np.random.default_rng(0)
    for lam in rng.uniform(0.05, 0.95, 200):
        top, bottom, left, right = cutmix_box(lam, 64, 64, rng)
        if 0 < top and bottom < 64 and 0 < left and right < 64:
            assert (bottom - top) * (right - left) / 64**2 == pytest.approx(1 - lam, abs=2 * 64 / 64**2 + 0.02)


def test_mix_prob_and_switch_prob_are_honoured():
    both = Mixer(2, mixup_alpha=0.2, cutmix_alpha=1.0, prob=0.6, switch_prob=0.25, seed=1)
    draws = [both.params(0, step, 8, 8) for step in range(2000)]
    mixed = [(lam, box) for lam, box in draws if lam < 1.0]
    assert len(mixed) / len(draws) == pytest.approx(0.6, abs=0.04)
    assert sum(box is not None for _, box in mixed) / len(mixed) == pytest.approx(0.25, abs=0.04)
    x, y = torch.randn(4, 1, 8, 8), torch.arange(4) % 2
    never = Mixer(2, mixup_alpha=1.0, prob=0.0)
    assert never(x, y, 0, 0) == (x, y)
    assert Mixer.from_config(OptimConfig(), 10, 0) is None
    assert Mixer.from_config(OptimConfig(cutmix_alpha=1.0, mix_prob=0.0), 10, 0) is None
    assert Mixer.from_config(OptimConfig(mixup_alpha=0.2), 10, 0).mixup_alpha == 0.2


def test_label_smoothing_on_mixed_targets_is_the_mix_of_smoothed_losses():
    torch.manual_seed(0)
    logits, y = torch.randn(6, 5), torch.tensor([0, 1, 2, 3, 4, 0])
    _, target = Mixer(5, mixup_alpha=0.4, seed=3)(torch.randn(6, 1, 2, 2), y, 2, 7)
    lam, _ = Mixer(5, mixup_alpha=0.4, seed=3).params(2, 7, 2, 2)
    for s in (0.0, 0.1):
        expected = (lam * F.cross_entropy(logits, y, label_smoothing=s)
                    + (1 - lam) * F.cross_entropy(logits, y.flip(0), label_smoothing=s))
        assert F.cross_entropy(logits, target, label_smoothing=s).item() == pytest.approx(expected.item(), rel=1e-6)
    # distillation losses take mixed targets: CE mixes, KD ignores labels, DKD decouples at the larger share
    teacher = [torch.randn(6, 5)]
    loss = DistillLoss(KD(4.0), alpha=0.9, ce_weight=0.1, label_smoothing=0.1)
    expected = 0.1 * F.cross_entropy(logits, target, label_smoothing=0.1) + 0.9 * KD(4.0)(logits, teacher)
    assert loss(logits, teacher, target).item() == pytest.approx(expected.item(), rel=1e-6)
    dkd = DKD(4.0)
    assert dkd(logits, teacher, target).item() == pytest.approx(dkd(logits, teacher, target.argmax(1)).item())


# ---------------------------------------------------------------------------------------- EMA

def test_ema_after_k_steps_is_the_hand_computed_average():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2))
    ema = EMA(model, decay=0.8)
    expected = [p.detach().clone().double() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for n in range(40):
        model(torch.randn(8, 3)).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad()
        ema.update(model)
        d = min(0.8, (1 + n) / (10 + n))    # warm-up: 0.1, 0.18, ... until it reaches the decay at n = 35
        expected = [d * e + (1 - d) * p.detach().double() for e, p in zip(expected, model.parameters())]
    assert ema.updates == 40 and ema.current_decay() == 0.8
    for e, p in zip(expected, ema.module.parameters()):
        assert torch.allclose(p.double(), e, atol=1e-6)
    assert not torch.allclose(ema.module[0].weight, model[0].weight)
    for (name, b_ema), b in zip(ema.module.named_buffers(), model.buffers()):
        assert torch.equal(b_ema, b), name                          # BN statistics copied, not averaged
    assert not any(p.requires_grad for p in ema.module.parameters()) and not ema.module.training
    # integer parameters (NNCF keeps bit widths so) are copied like buffers
    model.register_parameter("bits", nn.Parameter(torch.tensor([8], dtype=torch.int32), requires_grad=False))
    ema = EMA(model, 0.8)
    with torch.no_grad():
        model.bits.fill_(4)
        model[0].weight.add_(1.0)
    ema.update(model)
    assert ema.module.bits.item() == 4
    assert torch.allclose(ema.module[0].weight, model[0].weight - 0.1)    # first decay 0.1: 0.9 of the way
    fresh = EMA(model, 0.8)
    fresh.load_state_dict(ema.state_dict())
    assert fresh.updates == 1 and same_weights(fresh.module, ema.module)


@pytest.fixture(scope="module")
def tiny_data():
    cfg = DataConfig(dataset="synthetic", batch_size=16, val_size=32,
                     synthetic={"num_train": 160, "num_test": 32, "image_size": 8},
                     augment=AugmentConfig(crop_padding=1, hflip=True, rotation=15, erasing=0.5,
                                           erasing_value="random"))
    return build_data(cfg, CPU, seed=0)


QUALITY = OptimConfig(lr=0.05, mixup_alpha=0.4, cutmix_alpha=1.0, mix_prob=0.8, label_smoothing=0.1, ema_decay=0.9,
                      warmup_epochs=0.5)


def run_fit(data, opts=QUALITY, epochs=3, model=None, **kw):
    model = model or Net()
    metrics = fit(model, data, opts, epochs, device=CPU, progress=False, log=kw.pop("log", lambda m: None), **kw)
    return model, metrics


def test_fit_keeps_and_returns_the_ema_weights(tiny_data, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    model, metrics = run_fit(tiny_data, epochs=1, checkpoint=ckpt)
    state = torch.load(ckpt, weights_only=True)
    assert state["ema"]["updates"] == tiny_data.steps_per_epoch()
    ema_weights = state["ema"]["module"]
    assert all(torch.equal(state["progress"]["best_state"][k], v) for k, v in ema_weights.items())
    assert all(torch.equal(v, ema_weights[k]) for k, v in model.state_dict().items())
    assert not torch.equal(state["model"]["body.0.weight"], ema_weights["body.0.weight"])
    # the scored accuracy is the returned model's
    from compress.training import evaluate
    assert evaluate(model, tiny_data.eval_batches("val")) == metrics["best_accuracy"]


def test_short_fit_with_everything_on_learns_without_nans(tiny_data):
    torch.manual_seed(0)
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 4))
    model, metrics = run_fit(tiny_data, epochs=8, model=mlp)
    losses = [r["loss"] for r in metrics["history"]]
    assert all(math.isfinite(v) for v in losses) and sum(r["skipped_steps"] for r in metrics["history"]) == 0
    assert np.mean(losses[-3:]) < 0.93 * losses[0], losses            # mixed targets keep the loss high
    assert metrics["best_accuracy"] > 60                               # 4 classes: chance is 25%
    assert all(torch.isfinite(v).all() for v in model.state_dict().values() if v.is_floating_point())


def test_distilling_teachers_see_the_mixed_images(tiny_data):
    seen = {}
    student, teacher = Net(), nn.Sequential(nn.Flatten(), nn.Linear(64, 4))
    student.register_forward_hook(lambda m, i, o: seen.__setitem__("student", i[0]) if m.training else None)
    teacher.register_forward_hook(lambda m, i, o: seen.__setitem__("teacher", i[0]))
    loss = DistillLoss(DKD(4.0), alpha=1.0, ce_weight=1.0, label_smoothing=0.1)   # DKD needs hard labels: argmax
    _, metrics = run_fit(tiny_data, epochs=1, model=student, teachers=[teacher], kd_loss=loss)
    assert torch.equal(seen["student"], seen["teacher"])
    assert math.isfinite(metrics["history"][0]["loss"])


def test_qat_fine_tuning_with_ema_and_mixup(tiny_data):
    pytest.importorskip("nncf")
    from compress.losses import KDLoss
    from compress.quant import nncf_qdq

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                          nn.Flatten(), nn.Linear(8, 4))
    opts = OptimConfig(lr=0.002, schedule="cosine", ema_decay=0.9, mixup_alpha=0.2)
    _, info = nncf_qdq(model, tiny_data.calibration_images(32), (1, 8, 8), subset_size=32, finetune=lambda q: fit(
        q, tiny_data, opts, 1, device=CPU, teachers=[model], kd_loss=KDLoss(4.0, 0.9), progress=False,
        log=lambda m: None))
    assert info["qat"]["best_epoch"] == 1 and math.isfinite(info["qat"]["history"][0]["loss"])


def test_stop_mid_epoch_then_resume_with_everything_on_is_bit_exact(tiny_data, tmp_path):
    reference, ref_metrics = run_fit(tiny_data)
    ckpt = tmp_path / "checkpoint.pt"
    model = Net()
    handle = sigterm_at(model, 13)  # 8 steps and 1 evaluation (of the EMA copy, hooks and all) per epoch: epoch 2, step 4
    with pytest.raises(Interrupted, match=r"stopped by SIGTERM at epoch 2, step 4/8"):
        run_fit(tiny_data, model=model, checkpoint=ckpt)
    handle.remove()
    scramble_rngs()
    logs = []
    resumed, metrics = run_fit(tiny_data, checkpoint=ckpt, log=logs.append)
    assert "train: resuming from checkpoint.pt at epoch 2, step 4/8" in logs
    assert same_weights(resumed, reference)
    assert without_timing(metrics) == without_timing(ref_metrics)


def test_checkpoint_without_ema_is_not_resumed_with_ema_on(tiny_data, tmp_path):
    ckpt = tmp_path / "checkpoint.pt"
    run_fit(tiny_data, OptimConfig(lr=0.05), epochs=1, checkpoint=ckpt)
    logs = []
    run_fit(tiny_data, epochs=1, checkpoint=ckpt, log=logs.append)
    assert any("no moving average of the weights" in line and "from scratch" in line for line in logs), logs


# ------------------------------------------------------------------------------------- warm-up

def learning_rates(opts: OptimConfig, total: int, per_epoch: int) -> list[float]:
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=opts.lr, momentum=0.9)
    scheduler = make_scheduler(optimizer, opts, total, per_epoch)
    lrs = []
    for _ in range(total):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


@pytest.mark.parametrize("schedule", ["cosine", "constant"])
def test_linear_warmup_for_cosine_and_constant(schedule):
    lrs = learning_rates(OptimConfig(lr=0.4, schedule=schedule, warmup_epochs=2), total=50, per_epoch=5)
    assert lrs[:10] == pytest.approx([0.4 * (i + 1) / 10 for i in range(10)])
    assert max(lrs) == pytest.approx(0.4) and lrs[9] == pytest.approx(0.4)
    if schedule == "constant":
        assert lrs[10:] == pytest.approx([0.4] * 40)
    else:
        assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 0.01
    no_warmup = learning_rates(OptimConfig(lr=0.4, schedule=schedule), total=50, per_epoch=5)
    assert no_warmup[0] == pytest.approx(0.4)


def test_warmup_sets_the_rise_of_onecycle():
    default = learning_rates(OptimConfig(lr=0.4), total=100, per_epoch=10)
    assert int(np.argmax(default)) == 24                                 # a quarter of the steps
    for epochs, peak in ((2, 19), (0.05, 1), (50, 98)):                  # the rise is cut to [2, total - 1] steps
        lrs = learning_rates(OptimConfig(lr=0.4, warmup_epochs=epochs), total=100, per_epoch=10)
        assert int(np.argmax(lrs)) == peak and max(lrs) == pytest.approx(0.4)
        assert lrs[0] == pytest.approx(0.04)                             # starts at lr / 10, as without warm-up


@pytest.mark.parametrize("total", range(1, 12))
def test_onecycle_works_for_any_number_of_steps(total):
    # torch's OneCycleLR divides by zero when a phase is one step long (4 steps at 25%, say)
    lrs = learning_rates(OptimConfig(lr=0.4), total=total, per_epoch=2)
    assert len(lrs) == total and all(0 < lr <= 0.4 + 1e-9 for lr in lrs)
    if total > 2:
        assert 0.35 < max(lrs) <= 0.4 and lrs[0] == pytest.approx(0.04)  # the peak may fall between steps


# -------------------------------------------------------------------------------------- config

PIPELINE = textwrap.dedent("""\
    name: quality
    data: {dataset: synthetic, augment: {rotation: 10, erasing: 0.25}}
    stages:
      teacher: {type: train, model: resnet20, mixup_alpha: 0.2, cutmix_alpha: 1.0, ema_decay: 0.999}
      student: {type: distill, from: teacher, model: mobilenetv2_x0_35, label_smoothing: 0.1, warmup_epochs: 1}
    """)


@pytest.mark.parametrize("old,new,expect", [
    ("rotation: 10", "rotation: 200", "data.augment.rotation: expected less than or equal to 180"),
    ("rotation: 10", "rotation: -5", "data.augment.rotation: expected greater than or equal to 0"),
    ("erasing: 0.25", "erasing: 1.5", "data.augment.erasing: expected less than or equal to 1"),
    ("erasing: 0.25", "erasing: 0.25, erasing_area: [0.4, 0.1]", "erasing_area [0.4, 0.1]: min is above max"),
    ("erasing: 0.25", "erasing: 0.25, erasing_area: [0, 0.1]", "data.augment.erasing_area.0: expected greater than 0"),
    ("erasing: 0.25", "erasing: 0.25, erasing_value: noise", "data.augment.erasing_value: expected 'zero' or 'random'"),
    ("ema_decay: 0.999", "ema_decay: 1.0", "stages.teacher.ema_decay: expected less than 1"),
    ("mixup_alpha: 0.2", "mixup_alpha: -1", "stages.teacher.mixup_alpha: expected greater than or equal to 0"),
    ("cutmix_alpha: 1.0", "cutmix_alpha: 1.0, mix_prob: 2", "stages.teacher.mix_prob: expected less than or equal"),
    ("ema_decay: 0.999", "ema: 0.999", "unknown key 'ema'"),
])
def test_config_ranges(tmp_path, old, new, expect):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE.replace(old, new, 1))
    with pytest.raises(ConfigError) as info:
        load(path)
    assert expect in str(info.value) and "\n" not in str(info.value)


def test_config_loads_and_new_fields_stay_out_of_cache_keys_while_off(tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(PIPELINE)
    cfg = load(path)
    assert cfg.data.augment.rotation == 10 and cfg.stages["teacher"].ema_decay == 0.999
    assert cfg.stages["student"].ema_decay is None and cfg.stages["student"].mixup_alpha == 0
    dumped = cfg.stages["teacher"].model_dump(mode="json", by_alias=True)
    assert {"mixup_alpha", "cutmix_alpha", "ema_decay"} <= set(dumped) and "mix_prob" not in dumped
    # a config that does not use them dumps (and so hashes) as before they existed
    assert set(OptimConfig().model_dump()) == {"optimizer", "lr", "momentum", "weight_decay", "schedule",
                                               "warmup_epochs", "label_smoothing", "amp", "batch_size"}
    assert set(AugmentConfig().model_dump()) == {"crop_padding", "hflip"}
    assert "erasing" in cfg.data.augment.model_dump() and "erasing_area" not in cfg.data.augment.model_dump()
