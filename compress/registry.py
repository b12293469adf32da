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
    except (Exception, SystemExit, GeneratorExit) as exc:  # it raised, or tried to end the process (sys.exit)
        sys.modules.pop(mod_name, None)
        what = (f"called sys.exit({exc.code!r})" if isinstance(exc, SystemExit)
                else f"failed: {type(exc).__name__}: {_first_line(exc)}")
        raise ModelError(f"model {spec!r}: importing {str(path)!r} {what}") from None
    obj = getattr(module, cls_name, None)
    if obj is None:
        raise ModelError(f"model {spec!r}: {str(path)!r} has no attribute {cls_name!r}")
    if not callable(obj):
        raise ModelError(f"model {spec!r}: {cls_name} in {str(path)!r} is a {type(obj).__name__}, not a class or "
                         f"function that builds a torch.nn.Module")
    return obj


def _first_line(exc: BaseException, limit: int = 200) -> str:
    """The exception's message on one line, at most `limit` characters."""
    text = " ".join(str(exc).split())
    return text if len(text) <= limit else text[:limit - 1] + "\u2026"


def check_name(name: str, base_dir: Path | None = None) -> None:
    """ModelError unless `name` is a registered model or names an existing file.py (not imported here)."""
    if is_user_model(name):
        path = Path(name.rsplit(":", 1)[0])
        path = base_dir / path if not path.is_absolute() and base_dir is not None else path
        if not path.is_file():
            raise ModelError(f"model {name!r}: file {str(path)!r} does not exist")
        return
    _load_zoo()
    if name not in _MODELS:
        close = _closest(name, list(_MODELS)) if len(name) <= 100 else None
        hint = f"; did you mean {close!r}?" if close else "; run `compress models` to list them"
        shown = name if len(name) <= 60 else name[:59] + "\u2026"
        raise ModelError(f"unknown model {shown!r}{hint}")


def check_model(model: nn.Module, name: str, input_shape: tuple[int, int, int], num_classes: int) -> None:
    """ModelError unless `model` is something the stages can train, count, prune and export: real parameters
    (not lazy ones), and logits of shape (batch, classes) for every batch size (checked at 2 and 3)."""
    params = list(model.parameters())
    if not params:
        raise ModelError(f"model {name!r} has no parameters: there is nothing to train")
    if any(isinstance(p, nn.parameter.UninitializedParameter) for p in params):
        raise ModelError(f"model {name!r} uses lazy modules (nn.Lazy*): their shapes are unknown until the first "
                         f"batch; give in_features/in_channels explicitly")
    device = params[0].device
    was_training = model.training
    model.eval()
    try:
        for batch in (2, 3):
            try:
                with torch.no_grad():
                    out = model(torch.zeros(batch, *input_shape, device=device))
            except (Exception, SystemExit) as exc:
                raise ModelError(f"model {name!r} fails on a {tuple(input_shape)} input: "
                                 f"{type(exc).__name__}: {_first_line(exc)}") from None
            if not isinstance(out, torch.Tensor) or tuple(out.shape) != (batch, num_classes):
                shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                raise ModelError(f"model {name!r} returns {shape} for a batch of {batch}, expected "
                                 f"({batch}, {num_classes}) logits for the {num_classes} classes")
    finally:
        model.train(was_training)


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
        try:
            accepted = inspect.signature(factory).parameters
        except (TypeError, ValueError):  # a builtin or C callable: no introspectable signature
            accepted = {}
        call_kwargs = dict(kwargs)
        for key, value in (("num_classes", num_classes), ("in_channels", in_channels)):
            if key in accepted or any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
                call_kwargs[key] = value
        try:
            model = factory(**call_kwargs)
        except (Exception, SystemExit) as exc:
            raise ModelError(f"model {name!r}: constructing it failed: {type(exc).__name__}: "
                             f"{_first_line(exc)}") from None
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
