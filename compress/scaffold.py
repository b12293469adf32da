"""`compress init`: a commented starter pipeline for the model a user already has.

Given a model (registry name or file.py:Class), optional trained weights and an image folder, it
writes a pipeline that imports the model (or trains it, without weights), distills it into a student
suited to the input size, prunes the student to half its MACs, quantizes it to INT8 and benchmarks
everything. The file is validated (and the weights loaded into the model once) before it is written,
and an existing file is never overwritten.
"""

from __future__ import annotations

import re
from pathlib import Path

from compress.config import ConfigError

# Families built for 64-224 px inputs and ImageNet-style preprocessing (torchvision's architectures).
REAL_RESOLUTION = {"tv_resnet", "tv_mobilenetv2", "tv_mobilenetv3", "tv_shufflenetv2"}


class InitError(ValueError):
    """A request `compress init` cannot turn into a pipeline; one line for the user."""


def _relative(path: Path, start: Path) -> str:
    """`path` as the pipeline will name it: relative to the pipeline's folder when below it, else absolute."""
    path, start = path.resolve(), start.resolve()
    try:
        return str(path.relative_to(start))
    except ValueError:
        return str(path)


def _first_image(train: Path) -> Path:
    from compress.data.imagefolder import EXTENSIONS

    for cls in sorted(p for p in train.iterdir() if p.is_dir() and not p.name.startswith(".")):
        for image in sorted(cls.iterdir()):
            if image.suffix.lower() in EXTENSIONS:
                return image
    raise InitError(f"{train}: no images in its class subfolders (expected {train}/<class>/*.jpg)")


def _image_plan(data: Path, real_resolution: bool) -> tuple[int, int | None, int, list[str]]:
    """(image_size, resize or None, channels, class names) for the folder and the model's kind."""
    from PIL import Image

    train = data / "train"
    if not train.is_dir():
        raise InitError(f"{data}: no train/ folder (expected {data}/train/<class>/*.jpg)")
    classes = sorted(p.name for p in train.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise InitError(f"{train}: found {len(classes)} class subfolder(s); a classifier needs at least 2")
    image = _first_image(train)
    try:
        with Image.open(image) as img:
            short, channels = min(img.size), len(img.getbands())
    except Exception as exc:
        raise InitError(f"{image}: unreadable image ({type(exc).__name__})") from None
    if not real_resolution:
        return 32, None, channels, classes
    crop = max(32, min(224, int(short * 0.875)) // 8 * 8)   # ImageNet's 224 of 256, or what the images allow
    return crop, round(crop / 0.875), channels, classes


def _count_train_images(data: Path) -> int:
    from compress.data.imagefolder import EXTENSIONS

    return sum(1 for p in (data / "train").glob("*/*") if p.suffix.lower() in EXTENSIONS)


def render(model: str, weights: Path | None, data: Path, output: Path, finetune: bool = False) -> str:
    """The pipeline text (YAML with comments); `finetune`: the weights classify other classes, so the
    teacher is fine-tuned from them with a fresh classifier instead of imported as it is."""
    from compress.registry import is_user_model, list_models, model_family

    if not is_user_model(model) and model not in list_models():
        from compress.registry import _closest

        close = _closest(model, list_models())
        raise InitError(f"unknown model {model!r}" + (f"; did you mean {close!r}?" if close else
                                                      "; run `compress models` to list them"))
    family = model_family(model)
    real = family in REAL_RESOLUTION or is_user_model(model)
    image_size, resize, channels, classes = _image_plan(data, real)
    base = output.parent
    name = re.sub(r"[^A-Za-z0-9_.-]", "-", output.stem).strip("-.") or "pipeline"
    if real:
        student = "shufflenet_v2_x0_5" if model == "mobilenet_v3_small" else "mobilenet_v3_small"
    else:
        student = "shufflenetv2_x0_5" if model.startswith("mobilenetv2") else "mobilenetv2_x0_5"
    model_ref = model if not is_user_model(model) else f"{_relative(Path(model.rsplit(':', 1)[0]), base)}:" \
                                                       f"{model.rsplit(':', 1)[1]}"
    lines = [
        f"# Starter pipeline written by `compress init {model}"
        + (f" --weights {weights}" if weights else "") + f" --data {data}`.",
        "# Check it with `compress validate`, run it with `compress run`; every key is in the README.",
        f"name: {name}                       # runs/{name}/ and reports/{name}/",
        "seed: 0",
        "device: auto                     # cuda when torch sees a GPU, else cpu",
        "data:",
        "  dataset: imagefolder",
        f"  root: {data.resolve()}      # train/<class>/*.jpg, optional test/<class>/ ({len(classes)} classes, "
        f"{channels} channel{'s' if channels != 1 else ''})",
    ]
    if resize:
        lines += [
            f"  image_size: {image_size}                 # what the model sees: the centre crop for evaluation",
            f"  resize: {resize}                     # shorter side first (torchvision's Resize + CenterCrop)",
            f"  normalize: {'imagenet' if channels == 3 else 'dataset'}"
            "              # ImageNet's mean/std, what ImageNet-pretrained weights expect; or `dataset`, or "
            "mean:/std: lists",
            "  augment:",
            "    random_resized_crop: {scale: [0.35, 1.0]}   # training crops, batched on the device",
            "    hflip: true",
        ]
    else:
        lines += [f"  image_size: {image_size}                 # every image resized to this square (28-32 px models)"]
    lines += [
        "  batch_size: 64",
        f"  val_size: {min(500, max(1, _count_train_images(data) // 10))}"
        "                  # held out of train/ (fixed seed) to pick the best epoch and score imports",
        "stages:",
    ]
    if weights is not None and finetune:
        lines += [
            "  # The weights classify other classes than these: fine-tune them with a fresh classifier.",
            f"  teacher: {{type: train, model: {model_ref}, weights: {_relative(weights, base)}, "
            "reinit_classifier: true, epochs: 5, lr: 0.01}",
        ]
    elif weights is not None:
        lines += [
            "  # Your model as it is: loaded (weights_only), scored on val, exported to ONNX and checked.",
            f"  teacher: {{type: import, model: {model_ref}, weights: {_relative(weights, base)}}}",
            "  # To fine-tune it on these classes first, use instead:",
            f"  # teacher: {{type: train, model: {model_ref}, weights: {_relative(weights, base)}, "
            "reinit_classifier: true, epochs: 5, lr: 0.01}",
        ]
    else:
        lines += [
            "  # No weights given: train the model first (or add `weights: file.pt` to start from yours).",
            f"  teacher: {{type: train, model: {model_ref}, epochs: 10}}",
        ]
    lines += [
        "  # A small student learns from the teacher's soft targets (Hinton KD); `compress models` lists others.",
        f"  student: {{type: distill, from: teacher, model: {student}, epochs: 10, lr: 0.05}}",
        "  # Structured pruning to half the student's MACs, then KD fine-tuning from the teacher.",
        "  student-pruned: {type: prune, from: student, target_macs: 0.5, finetune_epochs: 2, lr: 0.01}",
        "  # INT8 (QDQ ONNX, what TensorRT takes), calibrated on training images.",
        "  student-int8: {type: quantize, from: student-pruned, method: ptq}",
        "# Accuracy (test split), size, MACs and latency of every model on every runtime present.",
        "benchmark: {runtimes: [torch, onnxruntime, tensorrt], batch_sizes: [1, 64]}",
    ]
    return "\n".join(lines) + "\n"


def init(model: str, weights: Path | None, data: Path, output: Path) -> str:
    """Write the starter pipeline to `output` (never over an existing file); return the command to run it."""
    from compress import config
    from compress.io import atomic_write_text

    if output.exists() or output.is_symlink():
        raise InitError(f"{output} exists; compress init does not overwrite files (choose another -o)")
    if not data.is_dir():
        raise InitError(f"--data {data}: no such directory")
    if weights is not None and not weights.is_file():
        raise InitError(f"--weights {weights}: no such file")
    text = render(model, weights, data, output)
    finetune = False
    if weights is not None:  # a checkpoint that does not fit fails now, not after the data is loaded
        _, _, channels, classes = _image_plan(data, False)
        finetune = _check_weights(model, weights, len(classes), channels)
        if finetune:
            text = render(model, weights, data, output, finetune=True)
    # Validate exactly what will be written, read from the folder it will live in (relative paths resolve there).
    probe = output.parent / f".{output.name}.init-check.yaml"
    try:
        atomic_write_text(probe, text)
        config.load(probe)
    except ConfigError as exc:
        raise InitError(f"the starter pipeline does not validate: {str(exc).replace(str(probe), str(output))}") \
            from None
    finally:
        probe.unlink(missing_ok=True)
    if output.exists():
        raise InitError(f"{output} exists; compress init does not overwrite files (choose another -o)")
    atomic_write_text(output, text)
    return f"compress run {output}"


def _check_weights(model_name: str, weights: Path, num_classes: int, channels: int) -> bool:
    """Load the weights into the model once: True when they fit but for the classifier's class count."""
    from compress.io import CheckpointError
    from compress.registry import create_model
    from compress.weights import load_weights

    model = create_model(model_name, num_classes=num_classes, in_channels=channels)
    try:
        load_weights(model, weights, num_classes=num_classes, model_name=repr(model_name))
        return False
    except CheckpointError as exc:
        if "reinit_classifier" not in str(exc):
            raise
    load_weights(model, weights, num_classes=num_classes, model_name=repr(model_name), reinit_classifier=True)
    return True
