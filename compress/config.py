"""Typed schema (pydantic) for a pipeline YAML, and a loader whose errors a person can act on.

A pipeline is a set of named stages; each model-producing stage names its input with
`from:`, so one teacher can feed several students and each student its own prune and
quantize chain. `load(path, overrides)` returns a validated `PipelineConfig` or raises
`ConfigError` with one line: file, line, field path, what was expected, closest valid key.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Callable, Literal, Union, get_args

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator, model_serializer,
                      model_validator)



MAX_INT = 2**31 - 1   # larger counts, sizes and seeds overflow torch/numpy later, or never finish
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"  # pipeline and stage names: directory names, Triton model names
MAX_NAME = 64


def _takes_bool(annotation) -> bool:
    return annotation is bool or any(_takes_bool(a) for a in get_args(annotation))


class Strict(BaseModel):
    # No NaN or infinity anywhere: a non-finite lr, temperature or weight decay only shows up as NaN weights later.
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _numbers_are_numbers(cls, data):
        """YAML's true/false are not 1/0, and an int beyond MAX_INT is a typo, not a setting.
        (A model validator: pydantic allows no field validator on a union's `type` tag. The error
        starts with the field's name; `load` moves it into the location.)"""
        if not isinstance(data, dict):
            return data
        for name, field in cls.model_fields.items():
            key = field.alias or name
            if key not in data:
                continue
            value = data[key]
            for item in value if isinstance(value, (list, tuple)) else [value]:
                if isinstance(item, bool) and not _takes_bool(field.annotation):
                    raise ValueError(f"{key}: expected a number, got the boolean {str(item).lower()}")
                if isinstance(item, int) and not isinstance(item, bool) and abs(item) > MAX_INT:
                    raise ValueError(f"{key}: {item if len(str(item)) <= 20 else str(item)[:19] + '…'} is too "
                                     f"large (at most {MAX_INT})")
        return data


def _omit_at_default(model: BaseModel, dumped: dict, names: tuple[str, ...]) -> dict:
    """Leave fields added after runs were cached out of a dump while they hold their defaults, so the
    cache keys (hashes of dumps) of configs that do not use them stay what they were."""
    for name in names:
        if name in type(model).model_fields and getattr(model, name) == type(model).model_fields[name].default:
            dumped.pop(name, None)
    return dumped


class ResizedCropConfig(Strict):
    """Random-resized-crop (Szegedy et al., 2015; torchvision's RandomResizedCrop): a box of random area and
    aspect ratio, resized to the model's input size (data.image_size); the usual ImageNet training crop."""

    scale: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.08, 1.0), description="[min, max] area of the box as a fraction of the (stored) image")
    ratio: tuple[Annotated[float, Field(gt=0)], Annotated[float, Field(gt=0)]] = Field(
        (3 / 4, 4 / 3), description="[min, max] aspect ratio (width / height) of the box, drawn log-uniformly")

    @model_validator(mode="after")
    def _ranges(self):
        for name in ("scale", "ratio"):
            lo, hi = getattr(self, name)
            if lo > hi:
                raise ValueError(f"random_resized_crop.{name} [{lo}, {hi}]: min is above max")
        return self


class AugmentConfig(Strict):
    """Per-image augmentation of training batches, on the device (compress.data.augment), in every stage."""

    # (bool in the type only for the shorthand: `true` becomes the defaults, `false` None, before validation)
    random_resized_crop: ResizedCropConfig | bool | None = Field(
        None, description="crop a random box and resize it to data.image_size, batched on the device (`true` for "
                          "torchvision's defaults, or {scale, ratio}); replaces the padded crop")

    crop_padding: int = Field(2, ge=0, description="random crop after zero padding by this many pixels (0: off)")
    hflip: bool = Field(True, description="random horizontal flip")
    rotation: float = Field(0.0, ge=0, le=180, description="random rotation by up to +- this many degrees "
                                                          "(bilinear, black corners; 0: off)")
    erasing: float = Field(0.0, ge=0, le=1, description="random erasing: probability that an image gets one "
                                                         "box erased (0: off; 0.25 is timm's usual)")
    erasing_area: tuple[Annotated[float, Field(gt=0, le=1)], Annotated[float, Field(gt=0, le=1)]] = Field(
        (0.02, 1 / 3), description="random erasing: [min, max] area of the box as a fraction of the image")
    erasing_value: Literal["zero", "random"] = Field(
        "zero", description="random erasing fills the box with zero (after normalization: the dataset mean) or "
                            "random (per-pixel N(0, 1) noise)")

    blur: float = Field(0.0, ge=0, le=1, description="Gaussian blur: probability that an image is blurred (0: off)")
    blur_sigma: tuple[Annotated[float, Field(gt=0, le=20)], Annotated[float, Field(gt=0, le=20)]] = Field(
        (0.1, 1.0), description="Gaussian blur: [min, max] std in pixels, drawn uniformly per image (the strength)")
    noise: float = Field(0.0, ge=0, le=1, description="Gaussian noise: probability that an image gets noise (0: off)")
    noise_std: float = Field(8.0, ge=0, le=255, description="Gaussian noise: std in grey levels of 0-255 (the "
                                                             "strength; 0: none)")
    brightness: float = Field(0.0, ge=0, lt=1, description="brightness jitter: factor drawn from [1-b, 1+b] per "
                                                           "image (0: off)")
    contrast: float = Field(0.0, ge=0, lt=1, description="contrast jitter: factor drawn from [1-c, 1+c] per image, "
                                                         "about the image's mean grey (0: off)")
    order: list[Literal["crop_flip", "rotation", "jitter", "blur", "noise"]] = Field(
        ["crop_flip", "rotation", "jitter", "blur", "noise"], description=(
            "the order of the pixel-space steps, each named once; normalization, then random erasing, come after"))

    @field_validator("random_resized_crop", mode="before")
    @classmethod
    def _rrc_shorthand(cls, value):
        return {} if value is True else (None if value is False else value)

    @model_validator(mode="after")
    def _area_range(self):
        if self.random_resized_crop is not None and "crop_padding" in self.model_fields_set and self.crop_padding:
            raise ValueError("crop_padding and random_resized_crop both crop; set crop_padding: 0 or drop one")
        if self.erasing_area[0] > self.erasing_area[1]:
            raise ValueError(f"erasing_area {list(self.erasing_area)}: min is above max")
        if self.blur_sigma[0] > self.blur_sigma[1]:
            raise ValueError(f"blur_sigma {list(self.blur_sigma)}: min is above max")
        steps = ["crop_flip", "rotation", "jitter", "blur", "noise"]
        if sorted(self.order) != sorted(steps):
            raise ValueError(f"order {self.order}: name each of {', '.join(steps)} exactly once")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _omit_at_default(self, handler(self), ("random_resized_crop", "rotation", "erasing", "erasing_area",
                                                      "erasing_value", "blur",
                                                      "blur_sigma", "noise", "noise_std", "brightness", "contrast",
                                                      "order"))


MAX_IMAGE_SIZE, MAX_CHANNELS = 4096, 64
MAX_BATCH = 1 << 16  # a larger batch does not fit any accelerator; it fails later, allocating
MAX_LR = 10.0  # above this every optimizer here diverges in a step or two: a typo (1e300), not a recipe
MAX_TEMPERATURE = 100.0  # KD softmax temperature: at 100 the soft targets are already uniform to 1e-3


def _physical_memory() -> int | None:
    import os

    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class SyntheticConfig(Strict):
    num_train: int = Field(512, ge=2)
    num_test: int = Field(128, ge=1)
    num_classes: int = Field(4, ge=2)
    image_size: int = Field(16, ge=4, le=MAX_IMAGE_SIZE)
    channels: int = Field(1, ge=1, le=MAX_CHANNELS)

    @model_validator(mode="after")
    def _fits_in_memory(self):
        need = (self.num_train + self.num_test) * self.channels * self.image_size ** 2  # uint8 images
        have = _physical_memory()
        if have is not None and need > have // 2:
            raise ValueError(f"{need / 2**30:.1f} GiB of images (num_train + num_test) x channels x image_size^2 "
                             f"do not fit in this machine's {have / 2**30:.1f} GiB of memory")
        if self.num_classes > self.num_train:
            raise ValueError(f"num_classes {self.num_classes} is more than num_train {self.num_train} images")
        return self


class DataConfig(Strict):
    dataset: Literal["fashion-mnist", "imagefolder", "synthetic"] = "fashion-mnist"
    root: Path | None = Field(None, description="dataset directory (fashion-mnist: the IDX files; imagefolder: "
                                                "train/ and test/ of class subfolders)")
    download: bool = Field(True, description="fashion-mnist: download to ~/.cache/compress when not found")
    image_size: int | None = Field(None, ge=4, le=MAX_IMAGE_SIZE, description="imagefolder: resize images to this square size "
                                   "(with `resize`: the model's input, centre-cropped from the resized image)")
    resize: int | None = Field(None, ge=4, le=MAX_IMAGE_SIZE, description=(
        "imagefolder: resize each image's shorter side to this and centre-crop it square (torchvision's Resize + "
        "CenterCrop); evaluation then centre-crops image_size from it (e.g. resize 256, image_size 224)"))
    normalize: Literal["dataset", "imagenet"] = Field(
        "dataset", description="per-channel mean/std: measured on the train split, or ImageNet's fixed values "
                               "(what a model pretrained on ImageNet expects); `mean`/`std` set them explicitly")
    mean: list[Annotated[float, Field(ge=-1e3, le=1e3)]] | None = Field(
        None, min_length=1, description="fixed per-channel mean on the [0, 1] scale (one per channel; with std)")
    std: list[Annotated[float, Field(gt=0, le=1e3)]] | None = Field(
        None, min_length=1, description="fixed per-channel std on the [0, 1] scale (one per channel; with mean)")
    batch_size: int = Field(256, ge=1, le=MAX_BATCH)
    eval_batch_size: int = Field(1024, ge=1, le=MAX_BATCH)
    val_size: int = Field(5000, ge=0, description="images held out of train for validation (fixed seed)")
    augment: AugmentConfig = AugmentConfig()
    synthetic: SyntheticConfig = SyntheticConfig()
    # Where the uint8 images live; neither changes a result (they are left out of cache keys).
    placement: Literal["auto", "device", "host"] = Field(
        "auto", description="device: the whole dataset is one tensor on the GPU, batches are gathered and augmented "
                            "there; host: it stays in (pinned) host memory and DataLoader workers gather batches "
                            "that are copied over asynchronously, then augmented on the GPU; auto: device when "
                            "the images take under a quarter of the free GPU memory (on CPU: device, except an "
                            "imagefolder cache larger than a quarter of the available memory, which is streamed)")
    workers: int = Field(2, ge=0, le=256, description="placement host: DataLoader worker processes gathering batches")
    cache: bool = Field(True, description="imagefolder: decode the images once into an on-disk uint8 cache and "
                                          "read them from it (placement host streams batches from the file); "
                                          "false: decode into memory on every run")
    cache_dir: Path | None = Field(None, description="imagefolder: where the decoded cache lives (default "
                                                     "<run root>/.cache; several nodes: shared storage, or a "
                                                     "local folder on each node)")

    @model_validator(mode="after")
    def _preprocessing(self):
        if (self.mean is None) != (self.std is None):
            raise ValueError("mean and std go together: give both, one value per channel")
        if self.mean is not None and self.normalize != "dataset":
            raise ValueError("normalize: imagenet sets mean and std; give either it or explicit mean/std")
        if self.mean is not None and len(self.mean) != len(self.std):
            raise ValueError(f"mean has {len(self.mean)} values and std {len(self.std)}; one per channel each")
        if self.resize is not None:
            if self.dataset != "imagefolder":
                raise ValueError("resize applies to the imagefolder dataset")
            if self.image_size is None:
                raise ValueError("resize needs image_size: the crop the model sees (e.g. resize 256, image_size 224)")
            if self.resize < self.image_size:
                raise ValueError(f"resize {self.resize} is below image_size {self.image_size}: the centre crop "
                                 f"would not fit")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _omit_at_default(self, handler(self), ("resize", "normalize", "mean", "std"))


# ----------------------------------------------------------------------------- stages

class OptimConfig(Strict):
    """How a stage trains (train, distill, and the fine-tuning after pruning)."""

    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(0.1, gt=0, le=MAX_LR, description="peak learning rate")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0, le=1)
    schedule: Literal["onecycle", "cosine", "constant"] = "onecycle"
    warmup_epochs: float = Field(0.0, ge=0, description="cosine, constant: linear warm-up from 0 over these epochs; "
                                                         "onecycle: the length of its rise from lr/10 (default a "
                                                         "quarter of the steps)")
    label_smoothing: float = Field(0.0, ge=0, lt=1, description="cross-entropy against (1 - s) * target + s / "
                                                                 "classes; with mixup/cutmix, of the mixed target")
    amp: bool = Field(True, description="mixed precision on CUDA (bf16 where supported); on CPU, false keeps "
                                        "bf16 out of cpu_fast_path: auto")
    cpu_fast_path: Literal["auto", "off", "channels_last", "bf16", "bf16_channels_last"] = Field(
        "auto", description="on CPU: channels-last memory and/or bf16 autocast for training, the teachers' forward "
                            "and evaluation; auto: what a short timed probe finds fastest for this model on this "
                            "machine (cached; bf16 only where the CPU has it natively: AMX / AVX-512 BF16); off: "
                            "fp32 as before (compress.fastpath)")
    batch_size: int | None = Field(None, ge=1, le=MAX_BATCH, description="overrides data.batch_size for this stage")
    compile: bool = Field(False, description="torch.compile the model being trained (faster steps on CUDA after "
                                             "a compile of tens of seconds; needs a C++ compiler on CPU)")
    # Regularization (all off by default); the teachers of a distilling stage see the same mixed images.
    mixup_alpha: float = Field(0.0, ge=0, description="mixup: blend each batch with itself reversed by lam ~ "
                                                       "Beta(a, a), labels alike (0: off; 0.2 is usual)")
    cutmix_alpha: float = Field(0.0, ge=0, description="cutmix: paste a box of the paired image, lam ~ Beta(a, a) "
                                                        "of the pixels kept, labels mixed by area (0: off; 1 is usual)")
    mix_prob: float = Field(1.0, ge=0, le=1, description="probability that a batch is mixed (mixup/cutmix on)")
    mix_switch_prob: float = Field(0.5, ge=0, le=1, description="with both mixup and cutmix on: probability "
                                                                 "that a mixed batch uses cutmix")
    ema_decay: float | None = Field(None, gt=0, lt=1, description="evaluate and keep an exponential moving "
                                    "average of the weights, decay min(d, (1 + n) / (10 + n)) at update n "
                                    "(e.g. 0.999; null: off)")

    @model_validator(mode="before")
    @classmethod
    def _fast_path_off(cls, data):
        return _yaml_off(data)

    @model_validator(mode="after")
    def _bf16_needs_amp(self):
        if not self.amp and self.cpu_fast_path.startswith("bf16"):
            raise ValueError(f"cpu_fast_path {self.cpu_fast_path} is mixed precision, but amp is false")
        return self

    @model_serializer(mode="wrap")
    def _dump(self, handler):
        return _omit_at_default(self, handler(self), ("mixup_alpha", "cutmix_alpha", "mix_prob", "mix_switch_prob",
                                                      "ema_decay", "compile", "weights", "reinit_classifier", "cpu_fast_path"))


def _yaml_off(data):
    """YAML 1.1 reads a bare `off` as false (and `on` as true): let `cpu_fast_path: off` mean "off"."""
    if isinstance(data, dict) and isinstance(data.get("cpu_fast_path"), bool):
        data = {**data, "cpu_fast_path": "off" if data["cpu_fast_path"] is False else "auto"}
    return data


# Distillation (distill stages, and the fine-tuning after prune). The loss is
#   ce_weight * CE(labels) + alpha * <logit method> + features.weight * <feature method>
# with defaults per method from each paper's CIFAR recipe (compress.losses has the papers):
#   method      temperature  alpha  ce_weight
#   kd          4            0.9    1 - alpha   (Hinton's convex mix)
#   dkd         4            1.0    1.0         (+ dkd: tckd 1, nckd 8, 0.5 epoch warm-up)
#   dist        4            1.0    1.0         (+ dist: inter 1, intra 1)
#   logit_std   2            9.0    0.1         (the base temperature after z-scoring)
#   none        -            0      1.0         (cross-entropy, plus features if given)
LOGIT_DEFAULTS: dict[str, tuple[float | None, float, float | None]] = {
    "kd": (4.0, 0.9, None), "dkd": (4.0, 1.0, 1.0), "dist": (4.0, 1.0, 1.0), "logit_std": (2.0, 9.0, 0.1),
    "none": (None, 0.0, 1.0)}
FEATURE_WEIGHTS = {"fitnet": 1.0, "at": 1000.0}


class DKDOptions(Strict):
    """Decoupled KD: the KD loss split into its target-class and non-target-class parts."""

    tckd: float = Field(1.0, ge=0, description="weight of target-class KD (the paper's alpha)")
    nckd: float = Field(8.0, ge=0, description="weight of non-target-class KD (the paper's beta)")
    warmup_epochs: float = Field(0.5, ge=0, description="the DKD term's weight rises linearly from 0 over "
                                                        "these epochs (the paper: 20 of 240; our schedules are short)")


class DISTOptions(Strict):
    """DIST: match the teacher's relations (Pearson correlation) rather than its exact probabilities."""

    inter: float = Field(1.0, ge=0, description="weight of the inter-class relation: each image's "
                                                "probabilities across classes (the paper's beta)")
    intra: float = Field(1.0, ge=0, description="weight of the intra-class relation: each class's "
                                                "probabilities across the batch (the paper's gamma)")


class FeatureConfig(Strict):
    """Feature distillation between named layers of the (first) teacher and the student."""

    method: Literal["fitnet", "at"] = Field(description="fitnet: regress the teacher's feature map through a "
                                                        "learned 1x1 adapter; at: match spatial attention maps")
    weight: float | None = Field(None, ge=0, description="default: fitnet 1, at 1000")
    pairs: list[tuple[str, str]] | None = Field(None, min_length=1, description=(
        "[teacher layer, student layer] module names (see `model.named_modules()`), e.g. [[stages.1, blocks.6]]; "
        "default: the teacher's last feature map before pooling with, for fitnet, the student's last one, for at, "
        "the student's deepest block at the teacher's resolution"))

    @model_validator(mode="after")
    def _weight(self):
        if self.weight is None:
            self.weight = FEATURE_WEIGHTS[self.method]
        return self


class KDConfig(Strict):
    method: Literal["kd", "dkd", "dist", "logit_std", "none"] = Field(
        "kd", description="logit distillation: kd (Hinton), dkd (decoupled), dist (correlations), logit_std "
                          "(z-scored KD), none (cross-entropy only, plus `features`)")
    temperature: float | None = Field(None, gt=0, le=MAX_TEMPERATURE, description="softmax temperature (default per method)")
    alpha: float | None = Field(None, ge=0, description="weight of the logit distillation term (default per method)")
    ce_weight: float | None = Field(None, ge=0, description="weight of cross-entropy on the labels (default: "
                                                            "kd 1 - alpha, dkd and dist 1, logit_std 0.1)")
    dkd: DKDOptions = DKDOptions()
    dist: DISTOptions = DISTOptions()
    features: FeatureConfig | None = Field(None, description="add a feature loss: {method: fitnet|at, weight, pairs}")
    teacher_weights: list[Annotated[float, Field(ge=0)]] | None = Field(
        None, min_length=1, description="relative weight of each teacher's soft targets (default: equal)")

    @model_validator(mode="after")
    def _method_defaults(self):
        for block, default in (("dkd", DKDOptions()), ("dist", DISTOptions())):
            if self.method != block and getattr(self, block) != default:
                raise ValueError(f"'{block}' options apply to method: {block}, but method is {self.method}")
        temperature, alpha, ce_weight = LOGIT_DEFAULTS[self.method]
        if self.method == "none" and self.alpha:
            raise ValueError("alpha weights the logit distillation term, and method: none has none")
        self.temperature = self.temperature if self.temperature is not None else temperature
        self.alpha = self.alpha if self.alpha is not None else alpha
        if self.ce_weight is None:
            if ce_weight is None and self.alpha > 1:
                raise ValueError(f"alpha={self.alpha} > 1 leaves 1 - alpha < 0 for cross-entropy; set ce_weight")
            self.ce_weight = round(1.0 - self.alpha, 12) if ce_weight is None else ce_weight
        if self.teacher_weights is not None and sum(self.teacher_weights) <= 0:
            raise ValueError("teacher_weights must not all be zero")
        return self


WEIGHTS_HELP = ("trained weights: a state_dict saved by torch.save (.pt/.pth), a .safetensors file, a checkpoint "
                "holding one under state_dict/model/ema/model_ema, or a compress model.pt; relative to the pipeline "
                "file; loaded with torch.load(weights_only=True), prefixes module./_orig_mod./model. stripped")


class FinetuneFrom(BaseModel):
    """`weights:` on train and distill: start from trained weights instead of a fresh initialisation."""

    weights: Path | None = Field(None, description="start training from these " + WEIGHTS_HELP)
    reinit_classifier: bool = Field(False, description="when the weights classify another number of classes: "
                                                       "start the classifier afresh (fine-tuning onto this data)")

    @model_validator(mode="after")
    def _reinit_needs_weights(self):
        if self.reinit_classifier and self.weights is None:
            raise ValueError("reinit_classifier applies to weights:, and this stage has none")
        return self


class TrainStage(OptimConfig, FinetuneFrom):
    type: Literal["train"]
    model: str = Field(description="registry name (see `compress models`) or path/to/file.py:ClassName")
    epochs: int = Field(3, ge=1)


class ImportStage(Strict):
    """A model trained elsewhere, brought in as it is: loaded, scored on val, exported; no training."""

    type: Literal["import"]
    model: str = Field(description="registry name (see `compress models`) or path/to/file.py:ClassName")
    weights: Path = Field(description=WEIGHTS_HELP)


class DistillStage(OptimConfig, KDConfig, FinetuneFrom):
    type: Literal["distill"]
    from_: str | list[str] = Field(alias="from", description="teacher stage name, or a list for an ensemble")
    model: str
    epochs: int = Field(3, ge=1)

    @model_validator(mode="after")
    def _one_weight_per_teacher(self):
        teachers = [self.from_] if isinstance(self.from_, str) else self.from_
        if self.teacher_weights is not None and len(self.teacher_weights) != len(teachers):
            raise ValueError(f"teacher_weights has {len(self.teacher_weights)} entries for {len(teachers)} "
                             f"teacher(s) in 'from'")
        return self


class SparsityConfig(Strict):
    """Network slimming's sparsity training: an L1 penalty pulls BatchNorm scales towards zero before ranking."""

    epochs: int = Field(1, ge=1, description="training epochs with the penalty (and the stage's loss) before pruning")
    strength: float = Field(1e-2, gt=0, description="loss += strength * sum of |BN scale| over the model (the "
                                                    "paper's 1e-4 is for 160 epochs; for one or two, see README)")


PRUNE_TARGETS = ("target_macs", "target_params", "target_latency_ms")


class PruneStage(OptimConfig, KDConfig):
    type: Literal["prune"]
    from_: str = Field(alias="from")
    # Exactly one target:
    target_macs: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the MACs")
    target_params: float | None = Field(None, gt=0, lt=1, description="keep this fraction of the parameters")
    target_latency_ms: float | None = Field(None, gt=0, description="prune until the median latency on "
                                                                    "latency_runtime is at most this many ms")
    latency_runtime: Literal["onnxruntime", "torch"] = Field(
        "onnxruntime", description="target_latency_ms: where latency is measured (onnxruntime: on the CPU, as "
                                   "the benchmark does; torch: on the pipeline's device)")
    latency_batch: int = Field(1, ge=1, le=MAX_BATCH, description="target_latency_ms: the batch size it is measured at")
    importance: Literal["l1", "l2", "lamp", "fpgm", "random", "taylor", "bn_scale"] = Field(
        "l1", description="channel score: l1/l2 weight magnitude, lamp, fpgm (geometric median), random, taylor "
                          "(|weight x gradient| of the stage's loss on training batches), bn_scale (|BN scale|, "
                          "network slimming; see sparsity)")
    taylor_batches: int = Field(4, ge=1, description="taylor: training batches whose loss gradients score the "
                                                     "channels, before every round")
    sparsity: SparsityConfig | None = Field(None, description="bn_scale: {epochs, strength} of L1-penalised "
                                                              "training on BN scales before pruning")
    global_pruning: bool = Field(False, description="rank channels across layers instead of pruning each "
                                                    "layer by the same ratio")
    round_to: int = Field(8, ge=1, description="pruned channel counts stay multiples of this")
    iterative_steps: int = Field(5, ge=1, description="pruning rounds (budgets shrink geometrically); each ends "
                                                      "with BN recalibration")
    finetune_between_epochs: int = Field(0, ge=0, description="KD fine-tuning epochs after every round but the "
                                                              "last, before the next ranking")
    finetune_epochs: int = Field(1, ge=0, description="KD fine-tuning epochs after the last round")
    teacher: str | list[str] | None = Field(None, description="stage(s) to distill from while fine-tuning "
                                                           "(default: the teacher of the pruned model)")
    lr: float = Field(0.02, gt=0, le=MAX_LR)

    @model_validator(mode="after")
    def _one_target(self):
        given = [t for t in PRUNE_TARGETS if getattr(self, t) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(PRUNE_TARGETS)}"
                             + (f" (got {', '.join(given)})" if given else ""))
        if self.target_latency_ms is None and {"latency_runtime", "latency_batch"} & self.model_fields_set:
            raise ValueError("latency_runtime and latency_batch apply to target_latency_ms")
        if "taylor_batches" in self.model_fields_set and self.importance != "taylor":
            raise ValueError(f"taylor_batches applies to importance: taylor, but importance is {self.importance}")
        if self.sparsity is not None and self.importance != "bn_scale":
            raise ValueError(f"sparsity applies to importance: bn_scale, but importance is {self.importance}")
        return self


class QuantizeStage(OptimConfig):
    type: Literal["quantize"]
    from_: str = Field(alias="from")
    method: Literal["ptq", "qat"] = Field("ptq", description="ptq: post-training INT8; qat: NNCF PTQ, then "
                                                            "quantization-aware fine-tuning with KD")
    backend: Literal["nncf", "onnxruntime"] = Field("nncf", description=(
        "nncf: NNCF on the PyTorch model; onnxruntime: ONNX Runtime static quantization of the parent's FP32 "
        "ONNX. Both write QDQ ONNX with signed int8, zero points 0 and per-channel weights (TensorRT's format)"))
    calibrate_method: Literal["minmax", "entropy", "percentile"] = Field(
        "minmax", description="onnxruntime: how activation ranges come from the calibration images (NNCF uses "
                              "min-max)")
    calibration_size: int = Field(512, ge=1, description="images used to calibrate")
    calibration_split: Literal["train", "val"] = Field(
        "train", description="where calibration images come from; never test. val is allowed, but then "
                             "max_accuracy_drop is judged partly on the images that calibrated")
    calibration_seed: int = Field(1, description="picks the calibration subset (the same images in every run "
                                                 "with the same seed; 1 is the dataset's historical subset)")
    max_accuracy_drop: float | None = Field(None, ge=0, description=(
        "accuracy-aware PTQ: if INT8 loses more than this many top-1 points against the FP32 parent on the val "
        "split, sweep the layers' sensitivity and keep the most sensitive ones in float, greedily, until it "
        "does not (none: keep every layer INT8)"))
    max_float_fraction: float = Field(0.25, gt=0, le=1, description=(
        "max_accuracy_drop: at most this fraction of the quantized layers may be kept float; when that is not "
        "enough, the best set found ships and the target is reported as not met (1: no limit)"))
    sensitivity_images: int | None = Field(1000, ge=1, description=(
        "the sweep scores each layer on the val images where INT8 departs most from FP32 (changed top-1 "
        "first, then logit error), this many of them (none: the whole split)"))
    sensitivity_sweep: bool = Field(False, description="run the per-layer sweep even when max_accuracy_drop "
                                                       "does not call for it (fills layers.md's sensitivity column)")
    # qat only: fine-tuning of the fake-quantized model (on TensorRT's int8 grid) against the teacher
    epochs: int = Field(1, ge=1, description="qat: fine-tuning epochs")
    lr: float = Field(0.002, gt=0, le=MAX_LR)
    schedule: Literal["onecycle", "cosine", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0, le=1)
    temperature: float = Field(4.0, gt=0, le=MAX_TEMPERATURE, description="qat: KD temperature")
    alpha: float = Field(0.9, ge=0, le=1, description="qat: weight of KD; 1-alpha goes to cross-entropy")
    teacher: str | list[str] | None = Field(None, description="qat: stage(s) to distill from (default: the "
                                                           "teacher of the quantized model)")

    @field_validator("calibration_split", mode="before")
    @classmethod
    def _never_test(cls, value):
        if value == "test":
            raise ValueError("the test split only scores models; calibrate on train or val")
        return value

    @model_validator(mode="after")
    def _backend_options(self):
        if self.method == "qat" and self.backend != "nncf":
            raise ValueError("method: qat fine-tunes NNCF's fake-quantized PyTorch model; use backend: nncf")
        if self.backend == "nncf" and self.calibrate_method != "minmax":
            raise ValueError(f"calibrate_method: {self.calibrate_method} is an onnxruntime option; NNCF "
                             f"calibrates with min-max")
        return self


# ----------------------------------------------------------------------------- the stage table

def _describe_prune(s: PruneStage) -> str:
    target = (f"keep {s.target_macs or s.target_params:g} of {'MACs' if s.target_macs else 'params'}"
              if s.target_latency_ms is None else f"under {s.target_latency_ms:g} ms ({s.latency_runtime})")
    return f"{target}, {s.importance}"


@dataclass(frozen=True)
class StageType:
    """One row of STAGE_TYPES: a stage type's schema and what the pipeline and the validator know of it.

    A new stage type is one row in STAGE_TYPES, plus its config class (with `type: Literal["<name>"]`)
    and its adapter `compress/stages/<name>.py` with `run(cfg, ctx) -> Artifact`; the config union, the
    "expected one of" messages, the graph checks, torchrun and `compress validate` read the table.
    """

    config: type[BaseModel]              # the schema; its `type` Literal is the stage type's name
    needs_from: bool = True              # `from:` is required (train builds its model from the registry)
    torch_model: bool = True             # its artifact holds a PyTorch model later stages can train on
    data_parallel: bool = False          # trained by every process under torchrun; otherwise rank 0 runs it
    # Who teaches it: "inputs" (its `from:`), "lineage" (`teacher:`, else its parent's teacher), or "none".
    teachers: Callable[[Any], str] = lambda cfg: "none"
    describe: Callable[[Any], str] = lambda cfg: cfg.model  # one cell of `compress validate`'s table

    @property
    def name(self) -> str:
        return get_args(self.config.model_fields["type"].annotation)[0]

    @property
    def module(self) -> str:
        return f"compress.stages.{self.name}"


STAGE_TYPES: dict[str, StageType] = {row.name: row for row in (
    StageType(TrainStage, needs_from=False, data_parallel=True),
    StageType(ImportStage, needs_from=False, describe=lambda cfg: f"{cfg.model} <- {cfg.weights}"),
    StageType(DistillStage, data_parallel=True, teachers=lambda cfg: "inputs"),
    StageType(PruneStage, data_parallel=True, teachers=lambda cfg: "lineage", describe=_describe_prune),
    StageType(QuantizeStage, torch_model=False, teachers=lambda cfg: "lineage" if cfg.method == "qat" else "none",
              describe=lambda cfg: f"{cfg.method} int8 ({cfg.backend})"),
)}

Stage = Annotated[Union[tuple(row.config for row in STAGE_TYPES.values())], Field(discriminator="type")]


# ----------------------------------------------------------------------------- the rest

class ExportConfig(Strict):
    opset: int = Field(17, ge=13, le=20)  # 20: the newest torch's TorchScript exporter (onnx_export) writes
    parity_images: int = Field(256, ge=1, description="test images used to check ONNX against PyTorch")


class EngineConfig(Strict):
    precisions: list[Literal["fp32", "fp16", "int8"]] = ["fp16", "int8"]
    min_batch: int = Field(1, ge=1, le=MAX_BATCH)
    opt_batch: int = Field(64, ge=1, le=MAX_BATCH)
    max_batch: int = Field(256, ge=1, le=MAX_BATCH)
    workspace_gb: float = Field(2.0, gt=0)

    @model_validator(mode="after")
    def _ordered(self):
        if not self.min_batch <= self.opt_batch <= self.max_batch:
            raise ValueError("expected min_batch <= opt_batch <= max_batch")
        return self


class BenchmarkConfig(Strict):
    runtimes: list[Literal["torch", "onnxruntime", "openvino", "tensorrt"]] = ["torch", "onnxruntime", "tensorrt"]
    batch_sizes: list[Annotated[int, Field(ge=1, le=MAX_BATCH)]] = [1, 64]
    warmup: int = Field(10, ge=0)
    iters: int = Field(50, ge=1)
    rounds: int = Field(5, ge=1, le=100, description="the timed iterations are split into this many rounds, "
                                                      "interleaved over the runtime's artifacts (each round "
                                                      "re-warmed), so a slow spell of the machine lands on every "
                                                      "artifact alike instead of on one")
    threads: int | None = Field(None, ge=1, le=1024, description="CPU threads (default: torch's default)")
    accuracy_split: Literal["test", "val"] = "test"
    cpu_fast_path: Literal["auto", "off", "channels_last", "bf16", "bf16_channels_last"] = Field(
        "auto", description="torch rows on CPU: channels-last and/or bf16 autocast; auto: what a short timed probe "
                            "of an inference forward finds fastest per model here (bf16 only with native AMX / "
                            "AVX-512 BF16); recorded as each row's fast_path")

    @model_validator(mode="before")
    @classmethod
    def _fast_path_off(cls, data):
        return _yaml_off(data)


class ReportConfig(Strict):
    dir: Path = Field(Path("reports"), description="reports go to <dir>/<pipeline name>/")


class TrackingConfig(Strict):
    """Experiment tracking after the report (compress.tracking); `tracking: mlflow` is short for {backend: mlflow}."""

    backend: Literal["mlflow"] = Field("mlflow", description="needs the tracking extra: pip install -e '.[tracking]' in the checkout")
    uri: str | None = Field(None, description="tracking URI, e.g. sqlite:///path/mlflow.db or http://host:5000 "
                                              "(default: $MLFLOW_TRACKING_URI, else sqlite:///<--out>/mlflow.db)")
    experiment: str | None = Field(None, min_length=1, description="experiment name (default: the pipeline name)")

    @model_validator(mode="before")
    @classmethod
    def _shorthand(cls, value):
        return {"backend": value} if isinstance(value, str) else value


class GraphError(ValueError):
    """A stage-graph error from PipelineConfig's validator; `loc` places it in the YAML, `shown` names it."""

    def __init__(self, loc: tuple, message: str, shown: str | None = None):
        self.loc, self.message, self.shown = loc, message, shown or ".".join(map(str, loc))
        super().__init__(f"{self.shown}: {message}")


class PipelineConfig(Strict):
    name: str = Field(max_length=MAX_NAME, pattern=NAME_PATTERN)
    seed: int = 0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataConfig = DataConfig()
    stages: dict[str, Stage]
    export: ExportConfig = ExportConfig()
    engine: EngineConfig = EngineConfig()
    benchmark: BenchmarkConfig = BenchmarkConfig()
    report: ReportConfig = ReportConfig()
    tracking: TrackingConfig | None = Field(None, description="log params, metrics and the report to an "
                                                              "experiment tracker, e.g. `tracking: mlflow`")

    @field_validator("name")
    @classmethod
    def _not_reserved(cls, name: str) -> str:
        # reports/<name>/ is where a run's report goes; reports/reference/ holds the committed references
        if name.lower() == "reference":
            raise ValueError("'reference' is reserved (reports/reference/ holds the committed reference reports); "
                             "choose another name")
        return name

    @field_validator("stages")
    @classmethod
    def _names(cls, stages: dict) -> dict:
        if not stages:
            raise ValueError("a pipeline needs at least one stage")
        import re

        for name in stages:
            if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name) or len(name) > MAX_NAME:
                shown = str(name) if len(str(name)) <= 40 else str(name)[:39] + "\u2026"
                raise ValueError(f"stage name {shown!r} must be a plain name: letters, digits, '_', '.', '-', "
                                 f"not starting with '.', '_' or '-', at most {MAX_NAME} characters")
        return stages

    @model_validator(mode="after")
    def _graph(self):
        _check_graph(self)  # unknown `from:`/`teacher:`, wrong kinds of input, cycles (GraphError)
        return self

    def inputs(self, stage_name: str) -> list[str]:
        src = getattr(self.stages[stage_name], "from_", None)
        return [] if src is None else ([src] if isinstance(src, str) else list(src))

    def order(self) -> list[str]:
        """Stages in dependency order (YAML order where free)."""
        done, left = _topological(self)
        if left:  # only a config built without validation (model_construct) gets here
            raise ValueError(f"the stages {', '.join(sorted(left))} depend on each other in a cycle")
        return done

    def extra_inputs(self, stage_name: str) -> list[str]:
        teacher = getattr(self.stages[stage_name], "teacher", None)
        return [] if teacher is None else ([teacher] if isinstance(teacher, str) else list(teacher))


# ----------------------------------------------------------------------------- loading

class ConfigError(ValueError):
    """One line for the user: file:line: field.path: what is wrong."""


def _node_at(node: yaml.Node | None, loc: tuple) -> tuple[yaml.Node | None, bool]:
    """Walk a composed YAML node along a pydantic error location; (deepest node, reached the end)."""
    for key in loc:
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                if k.value == str(key):
                    node = v
                    break
            else:
                return node, False
        elif isinstance(node, yaml.SequenceNode) and isinstance(key, int) and key < len(node.value):
            node = node.value[key]
        else:
            return node, False
    return node, True


def _key_node(node: yaml.Node | None, loc: tuple) -> yaml.Node | None:
    parent, ok = _node_at(node, loc[:-1])
    if ok and isinstance(parent, yaml.MappingNode):
        for k, _ in parent.value:
            if k.value == str(loc[-1]):
                return k
    return None


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model that owns the last key of `loc` (to suggest the closest valid key)."""
    model: Any = PipelineConfig
    i = 0
    while i < len(loc) - 1:
        key = loc[i]
        if model is PipelineConfig and key == "stages":
            # loc: stages, <name>, <type tag>, field...
            if i + 2 < len(loc) and loc[i + 2] in STAGE_TYPES:
                model, i = STAGE_TYPES[loc[i + 2]].config, i + 3
                continue
            return None
        field = model.model_fields.get(key) if isinstance(model, type) and issubclass(model, BaseModel) else None
        ann = getattr(field, "annotation", None)
        # An optional block (`features: FeatureConfig | None`): suggest the keys of the model inside.
        ann = next((a for a in get_args(ann) if isinstance(a, type) and issubclass(a, BaseModel)), ann)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model, i = ann, i + 1
    return model if isinstance(model, type) else None


def _clean_loc(loc: tuple) -> tuple:
    # pydantic puts the union tag into the path (stages.mnv2.distill.epochs); users wrote stages.mnv2.epochs.
    if len(loc) >= 3 and loc[0] == "stages" and loc[2] in STAGE_TYPES:
        loc = loc[:2] + loc[3:]
    return tuple(x for x in loc if not (isinstance(x, str) and x.startswith("function-")))


def _describe(err: dict, loc: tuple) -> str:
    kind, msg = err["type"], err["msg"]
    given = err.get("input")
    if kind == "extra_forbidden":
        model = _model_at(err["loc"])
        if model is not None:
            valid = [f.alias or n for n, f in model.model_fields.items()]
            close = difflib.get_close_matches(str(loc[-1]), valid, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else f"; valid keys: {', '.join(sorted(valid))}"
            return f"unknown key {shorten(str(loc[-1]))}{hint}"
        return f"unknown key {shorten(str(loc[-1]))}"
    if kind == "missing":
        return "required field is missing"
    if kind == "union_tag_invalid":
        return f"unknown stage type {shorten(given.get('type'))}; expected one of: {', '.join(STAGE_TYPES)}"
    if kind == "union_tag_not_found":
        return f"stage has no 'type'; expected one of: {', '.join(STAGE_TYPES)}"
    if kind == "literal_error":
        return f"{msg.replace('Input should be', 'expected')}, got {shorten(given)}"
    msg = msg.replace("Input should be", "expected").replace("Value error, ", "")
    if given is not None and not isinstance(given, (dict, list)):
        msg += f", got {shorten(given)}"
    return msg


def _where(path: str, root: yaml.Node | None, loc: tuple, overridden: set[str]) -> str:
    dotted = ".".join(str(x) for x in loc)
    if any(dotted == o or dotted.startswith(o + ".") for o in overridden):
        return f"{path} (--set {dotted})"
    node = _key_node(root, loc) if loc else None
    # A --set inside the failing block (or beside a key the file does not have) is named too: the
    # file's line alone would send the user to look for the mistake where it is not.
    setting = None
    for depth in range(len(loc), 0, -1):
        prefix = ".".join(str(x) for x in loc[:depth])
        under = sorted(o for o in overridden if o == prefix or o.startswith(prefix + "."))
        if under and (depth == len(loc) or node is None):
            setting = under[0]
            break
    if node is None:
        node, _ = _node_at(root, loc)
    where = f"{path}:{node.start_mark.line + 1}" if node is not None else path
    return f"{where} (--set {setting})" if setting else where


def parse_overrides(items: list[str]) -> list[tuple[list[str], Any]]:
    from compress.io import MAX_YAML_BYTES, YAMLInputError, load_yaml

    parsed = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set {shorten(item)}: expected key.path=value (e.g. --set stages.teacher.epochs=1)")
        shown = " ".join(key.split())[:60]
        if len(item) > MAX_YAML_BYTES // 16:
            raise ConfigError(f"--set {shown}: the value is {len(raw)} characters; at most "
                              f"{MAX_YAML_BYTES // 16} (put large settings in the pipeline file)")
        if any(not k.strip() for k in key.split(".")):
            raise ConfigError(f"--set {shown}: an empty part in the key path (write a.b.c)")
        try:
            value = load_yaml(raw)[0] if raw.strip() else ""
        except YAMLInputError as exc:
            if "malformed" not in str(exc):  # duplicate keys, alias bombs: refused, not taken as text
                raise ConfigError(f"--set {shown}: {exc}") from None
            value = raw
        parsed.append((key.strip().split("."), value))
    return parsed


def load(path: str | Path, overrides: list[str] | None = None) -> PipelineConfig:
    from compress.io import MAX_YAML_BYTES, FileReadError, YAMLInputError, load_yaml, read_regular_file

    path = Path(path)
    try:  # a regular file of bounded size (a FIFO or device is refused, never waited on)
        text = read_regular_file(path, MAX_YAML_BYTES, "pipeline file").decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such pipeline file") from None
    except FileReadError as exc:
        raise ConfigError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text (byte {exc.start}); a pipeline file is YAML text") from None
    try:  # duplicate keys, recursive aliases and alias bombs are refused before anything is built
        data, root = load_yaml(text)
    except YAMLInputError as exc:
        raise ConfigError(f"{path}:{exc.line}: {exc}" if exc.line else f"{path}: {exc}") from None
    if data is None:
        raise ConfigError(f"{path}: the file is empty; expected a mapping with 'name' and 'stages'")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}:1: expected a mapping with 'name' and 'stages', got {type(data).__name__}")
    if any(not isinstance(k, str) for k in data):
        raise ConfigError(f"{path}:1: top-level keys must be strings")

    overridden = set()
    for keys, value in parse_overrides(overrides or []):
        target = data
        for k in keys[:-1]:
            nxt = target.get(k) if isinstance(target, dict) else None
            if nxt is None:
                nxt = target[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"--set {'.'.join(keys)}: {k!r} is not a mapping")
            target = nxt
        target[keys[-1]] = value
        overridden.add(".".join(keys))

    try:
        cfg = PipelineConfig.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        graph = (err.get("ctx") or {}).get("error")
        if isinstance(graph, GraphError):
            raise ConfigError(f"{_where(str(path), root, graph.loc, overridden)}: {graph.shown}: "
                              f"{graph.message}") from None
        loc = _clean_loc(err["loc"])
        moved = re.match(r"Value error, ([A-Za-z_]+): ", err["msg"])  # a model validator naming its field
        if moved and isinstance(err.get("input"), dict) and moved.group(1) in err["input"]:
            loc += (moved.group(1),)
            err = {**err, "msg": "Value error, " + err["msg"][moved.end():], "input": None}
        more = f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{_where(str(path), root, loc, overridden)}: {'.'.join(map(str, loc)) or '<top>'}: "
                          f"{_describe(err, loc)}{more}") from None
    from compress.registry import ModelError, check_name

    for name, stage in cfg.stages.items():  # registry names and user files, as the stages will ask for them
        if isinstance(getattr(stage, "model", None), str):
            try:
                check_name(stage.model, path.parent)
            except ModelError as exc:
                raise ConfigError(f"{_where(str(path), root, ('stages', name, 'model'), overridden)}: "
                                  f"stages.{name}.model: {exc}") from None
    return cfg


def check_machine(cfg: PipelineConfig, path: str | Path) -> None:
    """What this machine cannot run, whatever the file says (`run` and `validate` call it; `load` does not,
    so a GPU pipeline still loads, e.g. to be checked, on a machine without one)."""
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{path}: device: cuda, but torch sees no CUDA GPU on this machine; use device: "
                              f"auto or cpu, or run it where there is one")


def shorten(value: Any, limit: int = 60) -> str:
    """repr(value), at most `limit` characters: a value echoed in an error never floods the terminal."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def weights_path(weights: Path, pipeline_dir: Path) -> Path:
    """A stage's `weights:` as a path: relative ones are relative to the pipeline file (as model files are)."""
    weights = Path(weights).expanduser()
    return weights if weights.is_absolute() else pipeline_dir / weights


def check_weights_files(cfg: PipelineConfig, pipeline_dir: Path) -> None:
    """A missing or unreadable `weights:` file fails a run before any stage (ConfigError, one line); its
    contents are checked when it is loaded. (Not part of `load`: an example pipeline names files to supply.)"""
    import os

    for name, stage in cfg.stages.items():
        weights = getattr(stage, "weights", None)
        if weights is None:
            continue
        file = weights_path(weights, pipeline_dir)
        problem = ("no such weights file" if not file.exists() else "not a file" if not file.is_file()
                   else "cannot read the weights file (permission denied)" if not os.access(file, os.R_OK) else None)
        if problem:
            raise ConfigError(f"stages.{name}.weights: {file}: {problem}")


def _topological(cfg: PipelineConfig) -> tuple[list[str], list[str]]:
    """The one topological sort: stages in dependency order, YAML order where free (the first free one each
    time), and the stages left over (on a cycle, below one, or after an unknown name)."""
    deps = {n: cfg.inputs(n) + cfg.extra_inputs(n) for n in cfg.stages}
    done, pending = [], list(cfg.stages)
    while (free := next((n for n in pending if all(d in done for d in deps[n])), None)) is not None:
        done.append(free)
        pending.remove(free)
    return done, pending


def _check_graph(cfg: PipelineConfig) -> None:
    """The stage graph's checks (PipelineConfig's validator): raises GraphError."""
    names = list(cfg.stages)
    for name, stage in cfg.stages.items():
        for key, deps in (("from", cfg.inputs(name)), ("teacher", cfg.extra_inputs(name))):
            for dep in deps:
                if dep not in cfg.stages:
                    close = difflib.get_close_matches(dep, names, n=1)
                    hint = f"; did you mean {close[0]!r}?" if close else f"; stages are: {', '.join(names)}"
                    raise GraphError(("stages", name, key), f"no stage named {dep!r}{hint}")
                if dep == name:
                    raise GraphError(("stages", name, key), "a stage cannot take its own output")
                if not STAGE_TYPES[cfg.stages[dep].type].torch_model:
                    source = cfg.inputs(dep)[0] if cfg.inputs(dep) else None
                    step = (f"; {stage.type} from {source!r}, the float model {dep!r} was made from"
                            if source and key == "from" else "; name a stage that holds a PyTorch model")
                    raise GraphError(("stages", name, key), f"{dep!r} is already an INT8 ONNX model, and a "
                                     f"{stage.type} stage needs a PyTorch model as its {key}{step}")
        if STAGE_TYPES[stage.type].needs_from and not cfg.inputs(name):
            raise GraphError(("stages", name), f"a {stage.type} stage needs 'from'")
    # Anything the topological sort leaves over sits on a cycle or below one.
    remaining = {n: set(cfg.inputs(n) + cfg.extra_inputs(n)) for n in _topological(cfg)[1]}
    # Drop stages that merely hang below a cycle (nothing left depends on them).
    while True:
        needed = set().union(*remaining.values()) if remaining else set()
        sinks = [n for n in remaining if n not in needed]
        if not sinks:
            break
        for n in sinks:
            del remaining[n]
    if remaining:
        cycle = sorted(remaining)
        raise GraphError(("stages", cycle[0]), f"the stages {', '.join(cycle)} depend on each other in a cycle",
                         shown="stages")
