"""Model registry, the timm way: a model variant is a registered function, built by name.

`create_model("mobilenetv2_x0_5", num_classes=10, in_channels=1)` builds a registered model;
`create_model("path/to/file.py:ClassName", ...)` builds a user's own ``nn.Module`` from a file.
"""

from __future__ import annotations

import fnmatch
import importlib
import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Callable

import torch
from torch import nn

_MODELS: dict[str, Callable[..., nn.Module]] = {}
_FAMILIES: dict[str, str] = {}


class ModelError(ValueError):
    """A model name or user module that cannot be built; the message is meant for the user."""


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register ``fn(num_classes=..., in_channels=...)`` under its function name."""
    name = fn.__name__
    if name in _MODELS and _MODELS[name] is not fn:
        raise ValueError(f"model {name!r} is registered twice")
    _MODELS[name] = fn
    _FAMILIES[name] = fn.__module__.rsplit(".", 1)[-1]
    return fn


def _load_zoo() -> None:
    # The zoo lives in top-level packages; importing them runs the @register_model decorators.
    for pkg in ("teachers", "students"):
        importlib.import_module(pkg)


def list_models(pattern: str | None = None) -> list[str]:
    _load_zoo()
    names = sorted(_MODELS)
    return [n for n in names if fnmatch.fnmatch(n, pattern)] if pattern else names


def model_family(name: str) -> str:
    _load_zoo()
    return _FAMILIES.get(name, "user")


def is_user_model(name: str) -> bool:
    return ":" in name and name.split(":", 1)[0].endswith(".py")


def _load_user_class(spec: str, base_dir: Path | None) -> Callable[..., nn.Module]:
    file, cls_name = spec.rsplit(":", 1)
    path = Path(file)
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    if not path.is_file():
        raise ModelError(f"model {spec!r}: file {str(path)!r} does not exist")
    mod_name = f"compress_user_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(mod_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[mod_name] = module
        module_spec.loader.exec_module(module)
    except Exception as exc:  # the user's file raised while importing
        sys.modules.pop(mod_name, None)
        raise ModelError(f"model {spec!r}: importing {str(path)!r} failed: {type(exc).__name__}: {exc}") from None
    obj = getattr(module, cls_name, None)
    if obj is None:
        raise ModelError(f"model {spec!r}: {str(path)!r} has no attribute {cls_name!r}")
    return obj


def _closest(name: str, names: list[str]) -> str | None:
    """The most similar name (difflib ratio >= 0.6); ties go to the longest common prefix (resnet21 -> resnet20)."""
    import difflib
    import os.path

    scored = [(difflib.SequenceMatcher(None, name, n).ratio(), len(os.path.commonprefix([name, n])), n) for n in names]
    best = max(scored, default=None)
    return best[2] if best is not None and best[0] >= 0.6 else None


def create_model(name: str, num_classes: int = 10, in_channels: int = 1, base_dir: Path | None = None,
                 **kwargs) -> nn.Module:
    """Build a registered model (or ``file.py:Class``) for ``in_channels`` inputs and ``num_classes`` outputs."""
    if is_user_model(name):
        factory = _load_user_class(name, base_dir)
        accepted = inspect.signature(factory).parameters
        call_kwargs = dict(kwargs)
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if key in accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
                call_kwargs[key] = value
        try:
            model = factory(**call_kwargs)
        except Exception as exc:
            raise ModelError(f"model {name!r}: constructing it failed: {type(exc).__name__}: {exc}") from None
        if not isinstance(model, nn.Module):
            raise ModelError(f"model {name!r}: did not return a torch.nn.Module")
        return model
    _load_zoo()
    if name not in _MODELS:
        close = _closest(name, list(_MODELS))
        hint = f"; did you mean {close!r}?" if close else "; run `compress models` to list them"
        raise ModelError(f"unknown model {name!r}{hint}")
    return _MODELS[name](num_classes=num_classes, in_channels=in_channels, **kwargs)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, input_size: tuple[int, int, int]) -> int:
    """Multiply-accumulates of one forward pass on a single (C, H, W) input.

    Counted by torch-pruning's op counter (convolutions, linear layers, norms), the same
    counter the prune stage uses for its targets.
    """
    import torch_pruning as tp

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    with torch.no_grad():
        macs, _ = tp.utils.count_ops_and_params(model, torch.zeros(1, *input_size, device=device))
    model.train(was_training)
    return int(macs)
