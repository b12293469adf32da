"""Atomic writes and the self-describing model file.

Every file the pipeline writes goes to a temp file in the same directory, is flushed and
fsync'd, then renamed over the target: a kill mid-save leaves the previous file whole.

A model file is a plain dict loadable with ``torch.load(weights_only=True)``: the registry
name and kwargs to rebuild the architecture, the state dict, and the shapes of every
conv/linear/norm layer, so that a pruned model (whose channel counts changed) is rebuilt
exactly. No pickled modules: a checkpoint from a stranger cannot run code.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FORMAT = "compress.model/1"
# Module attributes that define a layer's shape; pruning rewrites them together with the weights.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_channels", "num_groups")


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


def atomic_torch_save(obj: Any, path: str | os.PathLike) -> Path:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return atomic_write_bytes(path, buf.getvalue())


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    shapes = {}
    for name, module in model.named_modules():
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS if hasattr(module, a)}
        attrs = {a: (list(v) if isinstance(v, tuple) else v) for a, v in attrs.items() if isinstance(v, (int, tuple))}
        if attrs:
            shapes[name] = attrs
    return shapes


def save_model(model: nn.Module, path: str | os.PathLike, *, name: str, num_classes: int, in_channels: int,
               extra: dict | None = None) -> Path:
    payload = {
        "format": MODEL_FORMAT,
        "model": name,
        "num_classes": num_classes,
        "in_channels": in_channels,
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "shapes": _layer_shapes(model),
        "extra": extra or {},
    }
    return atomic_torch_save(payload, path)


class CheckpointError(ValueError):
    """A model file that cannot be trusted or read; the message is meant for the user."""


def read_model_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such model file") from None
    except Exception as exc:  # pickle payloads are refused here, never retried unsafely
        raise CheckpointError(f"{path}: not a readable compress model file ({type(exc).__name__}: "
                              f"{str(exc).splitlines()[0][:200]})") from None
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a compress model file (expected format {MODEL_FORMAT!r})")
    return payload


def load_model(path: str | os.PathLike, base_dir: Path | None = None) -> nn.Module:
    """Rebuild the architecture from the registry, reshape pruned layers, load the weights."""
    from compress.registry import create_model

    payload = read_model_file(path)
    model = create_model(payload["model"], num_classes=payload["num_classes"],
                         in_channels=payload["in_channels"], base_dir=base_dir)
    modules = dict(model.named_modules())
    for mname, attrs in payload["shapes"].items():
        module = modules.get(mname)
        if module is None:
            continue
        for attr, value in attrs.items():
            if hasattr(module, attr):
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    # Resize parameters and buffers to the saved shapes before loading (pruned layers shrank).
    state = payload["state_dict"]
    for key, tensor in state.items():
        owner_name, _, leaf = key.rpartition(".")
        owner = modules.get(owner_name)
        if owner is None:
            continue
        current = getattr(owner, leaf, None)
        if isinstance(current, torch.Tensor) and current.shape != tensor.shape:
            if isinstance(current, nn.Parameter):
                setattr(owner, leaf, nn.Parameter(torch.empty_like(tensor), requires_grad=current.requires_grad))
            else:
                owner.register_buffer(leaf, torch.empty_like(tensor))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']!r}: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return model
