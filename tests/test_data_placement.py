"""Datasets that stay in host memory (placement: host) stream the same batches as on-device ones."""

import torch

from compress.config import DataConfig
from compress.data import build_data

CPU = torch.device("cpu")


def make(placement: str, workers: int = 0):
    cfg = DataConfig(dataset="synthetic", batch_size=24, val_size=16, placement=placement, workers=workers,
                     augment={"crop_padding": 2, "hflip": True, "rotation": 10, "erasing": 0.5},
                     synthetic={"num_train": 100, "num_test": 20, "image_size": 12})
    return build_data(cfg, CPU, seed=3)


def test_host_placement_streams_identical_batches_through_workers():
    on_device, on_host = make("device"), make("host", workers=2)
    assert (on_device.placement, on_host.placement) == ("device", "host")
    for epoch in (0, 1):
        a, b = list(on_device.train_batches(epoch)), list(on_host.train_batches(epoch))
        assert len(a) == len(b) == on_device.steps_per_epoch()
        for (xa, ya), (xb, yb) in zip(a, b):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    for split in ("val", "test"):
        for (xa, ya), (xb, yb) in zip(on_device.eval_batches(split, 7), on_host.eval_batches(split, 7)):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert torch.equal(on_device.calibration_images(9), on_host.calibration_images(9))
    assert on_device.mean == on_host.mean and on_device.std == on_host.std


def test_auto_placement_on_cpu_is_the_device_and_does_not_change_cache_keys():
    from compress.config import PipelineConfig
    from compress.pipeline import stage_key

    assert make("auto").placement == "device"
    stages = {"t": {"type": "train", "model": "resnet8"}}
    keys = {stage_key(PipelineConfig(name="p", stages=stages, data=data), "t", [], "fp")
            for data in ({}, {"placement": "host", "workers": 4}, {"placement": "device"})}
    assert len(keys) == 1
    other = PipelineConfig(name="p", stages=stages, data={"batch_size": 32})
    assert stage_key(other, "t", [], "fp") not in keys
