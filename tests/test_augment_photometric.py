"""Gaussian blur, Gaussian noise, brightness/contrast jitter and the YAML's order of the augmentation steps."""

from __future__ import annotations

import pytest
import torch

from compress.config import AugmentConfig, ConfigError, DataConfig, SyntheticConfig
from compress.data import build_data
from compress.data.augment import add_noise, brightness_contrast, gaussian_blur

CPU = torch.device("cpu")


def synthetic(**augment) -> DataConfig:
    syn = SyntheticConfig(num_train=96, num_test=32, num_classes=3, image_size=12)
    return DataConfig(dataset="synthetic", synthetic=syn, val_size=32, batch_size=32,
                      augment=AugmentConfig(crop_padding=0, hflip=False, **augment))


def test_each_step_is_the_identity_at_strength_zero():
    x = torch.randint(0, 256, (4, 3, 9, 11)).float()
    assert torch.equal(gaussian_blur(x, torch.zeros(4)), x)
    assert torch.equal(add_noise(x, torch.zeros(4), torch.randn_like(x)), x)
    assert torch.equal(brightness_contrast(x, torch.ones(4), torch.ones(4)), x)


def test_blur_is_the_gaussian_per_image_and_keeps_shape_and_mean():
    x = torch.zeros(3, 1, 15, 15)
    x[:, :, 7, 7] = 255.0
    sigma = torch.tensor([0.0, 1.0, 2.0])
    y = gaussian_blur(x, sigma)
    assert y.shape == x.shape
    assert torch.equal(y[0], x[0])                                  # per-image: sigma 0 leaves image 0 alone
    assert torch.allclose(y.sum((1, 2, 3)), x.sum((1, 2, 3)), rtol=1e-4)   # mass kept (away from the border)
    taps = torch.arange(-7, 8, dtype=torch.float32)
    g = torch.exp(-0.5 * (taps / 2.0) ** 2)
    g = g[1:-1] / g[1:-1].sum()   # the kernel spans 3 sigma of the widest image: radius 6 for sigma 2
    expect = 255.0 * torch.outer(g, g)
    assert torch.allclose(y[2, 0, 1:-1, 1:-1], expect, atol=1e-3) and y[2, 0, 0].abs().max() < 1e-6
    assert y[1, 0].max() > y[2, 0].max()                            # a wider blur spreads further
    # a kernel sized for the config's largest sigma (away from the borders) gives the same image to within
    # 0.1 grey level: the taps beyond 3 sigma hold 0.3% of a Gaussian's mass
    big = torch.zeros(3, 1, 41, 41)
    big[:, :, 20, 20] = 255.0
    assert (gaussian_blur(big, sigma, max_sigma=3.0) - gaussian_blur(big, sigma)).abs().max() < 0.1


def test_noise_has_the_asked_std_and_stays_in_pixel_range():
    x = torch.full((2, 1, 64, 64), 128.0)
    y = add_noise(x, torch.tensor([0.0, 10.0]), torch.randn(2, 1, 64, 64, generator=torch.Generator().manual_seed(0)))
    assert torch.equal(y[0], x[0]) and abs((y[1] - 128).std().item() - 10) < 0.5
    assert add_noise(torch.full((1, 1, 4, 4), 250.0), torch.tensor([100.0]), torch.ones(1, 1, 4, 4)).max() == 255


def test_brightness_and_contrast_factors():
    x = torch.tensor([[[[50.0, 150.0]]]])
    assert torch.allclose(brightness_contrast(x, torch.tensor([1.2]), torch.ones(1)), x * 1.2)
    assert torch.allclose(brightness_contrast(x, torch.ones(1), torch.tensor([0.5])), torch.tensor([[[[75.0, 125.0]]]]))


def test_batches_are_seeded_per_seed_and_epoch_and_on_steps_change_nothing_else():
    on = dict(blur=0.5, noise=0.5, noise_std=12.0, brightness=0.3, contrast=0.3)
    dm = build_data(synthetic(**on), CPU, seed=0)
    a, b = list(dm.train_batches(1)), list(dm.train_batches(1))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    other_epoch = list(dm.train_batches(2))
    assert not torch.equal(a[0][0], other_epoch[0][0])
    plain = list(build_data(synthetic(), CPU, seed=0).train_batches(1))
    assert all(torch.equal(y1, y0) for (_, y1), (_, y0) in zip(a, plain))   # same order: the draws come after
    assert not torch.equal(a[0][0], plain[0][0])
    assert all(torch.equal(x, x0) for (x, _), (x0, _) in zip(dm.train_batches(1, augment=False), plain))


def test_order_is_honoured():
    base = dict(brightness=0.5, noise=1.0, noise_std=30.0)
    first = list(build_data(synthetic(**base, order=["noise", "jitter", "crop_flip", "rotation", "blur"]), CPU,
                            seed=0).train_batches(1))
    second = list(build_data(synthetic(**base), CPU, seed=0).train_batches(1))
    assert not torch.equal(first[0][0], second[0][0])   # noise then scaling is not scaling then noise


@pytest.mark.parametrize("bad, needle", [
    (dict(order=["blur", "noise"]), "exactly once"),
    (dict(order=["blur", "blur", "noise", "jitter", "crop_flip"]), "exactly once"),
    (dict(order=["sharpen", "blur", "noise", "jitter", "crop_flip"]), "sharpen"),
    (dict(blur_sigma=(2.0, 1.0)), "min is above max"),
    (dict(noise_std=-1.0), "noise_std"),
    (dict(brightness=1.0), "brightness"),
    (dict(blur=float("inf")), "blur"),
])
def test_bad_augment_settings_are_rejected(bad, needle):
    from pydantic import ValidationError

    with pytest.raises((ValidationError, ConfigError)) as exc:
        AugmentConfig(**bad)
    assert needle in str(exc.value)


def test_defaults_leave_the_config_dump_unchanged():
    # cache keys are hashes of config dumps: the new keys at their defaults must not change them
    assert set(AugmentConfig().model_dump()) == {"crop_padding", "hflip"}
