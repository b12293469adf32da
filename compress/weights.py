"""Trained weights from elsewhere: read a checkpoint in any usual form and load it into a model.

People arrive with weights saved by their own training script, not by compress. The forms seen
in practice, all read without unpickling code (``torch.load(weights_only=True)``):

* a plain ``state_dict`` saved by ``torch.save(model.state_dict(), path)``;
* a ``.safetensors`` file (Hugging Face's format: a JSON header and raw tensors, no code at all);
* a training checkpoint dict with the weights under a usual key: ``state_dict``, ``model``,
  ``ema``, ``model_ema``, ``state_dict_ema``, ``module``, ``net`` (EMA first when both are there:
  it is the one people evaluate);
* compress's own ``model.pt`` (pruned layer shapes included).

Wrappers leave prefixes on every key: ``module.`` (DataParallel / DDP), ``_orig_mod.``
(torch.compile), ``model.`` (Lightning and many trainers). They are stripped when, and only
when, stripping makes the keys match the model better: a model whose own first layer is called
``model`` keeps its keys.

Every failure is a `CheckpointError` with one line: the file, and what to do about it.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from compress.io import MODEL_FORMAT, CheckpointError, nonfinite_tensors, reshape_to, safe_load

# Where training scripts put the weights inside a checkpoint dict, most wanted first.
WEIGHT_KEYS = ("model_ema", "state_dict_ema", "ema", "state_dict", "model", "module", "net", "network")
PREFIXES = ("module.", "_orig_mod.", "model.")
# Buffers a wrapper adds that no model has (torch.optim.swa_utils.AveragedModel's update count).
WRAPPER_KEYS = ("n_averaged",)


def weights_digest(path: str | os.PathLike) -> str:
    """The file's sha256 (for cache keys), with the same one-line errors as reading it."""
    from compress.io import sha256_file

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such weights file" if not path.exists() else f"{path}: not a file")
    try:
        return sha256_file(path)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read the weights file ({exc.strerror or exc})") from None


def read_state_dict(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict]:
    """(state dict, info) from a weights file of any supported form; info says what was found."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such weights file")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file")
    if not os.access(path, os.R_OK):
        raise CheckpointError(f"{path}: cannot read the weights file (permission denied)")
    if path.suffix == ".safetensors":
        return _read_safetensors(path), {"format": "safetensors"}
    obj = safe_load(path, "weights file")
    if isinstance(obj, dict) and obj.get("format") == MODEL_FORMAT:
        return dict(obj["state_dict"]), {"format": MODEL_FORMAT, "model": obj.get("model"),
                                         "shapes": obj.get("shapes") or {}}
    state, where = _find_state_dict(obj)
    if state is None:
        what = f"a dict with keys {', '.join(map(repr, list(obj)[:6]))}" if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: no weights found: expected a state_dict (names -> tensors) or a checkpoint "
                              f"holding one under {', '.join(WEIGHT_KEYS)}; the file holds {what}")
    return state, {"format": "state_dict" if not where else f"checkpoint[{where!r}]"}


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise CheckpointError(f"{path}: reading .safetensors needs the safetensors package: "
                              f"pip install safetensors") from None
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        first = str(exc).splitlines()[0][:160] if str(exc) else type(exc).__name__
        raise CheckpointError(f"{path}: not a readable safetensors file (corrupt or truncated: {first})") from None


def _is_state_dict(obj) -> bool:
    return (isinstance(obj, dict) and bool(obj) and all(isinstance(k, str) for k in obj)
            and all(isinstance(v, torch.Tensor) for v in obj.values()))


def _find_state_dict(obj, depth: int = 0) -> tuple[dict | None, str]:
    if _is_state_dict(obj):
        return obj, ""
    if not isinstance(obj, dict) or depth > 2:
        return None, ""
    for key in WEIGHT_KEYS:
        if key in obj:
            found, inner = _find_state_dict(obj[key], depth + 1)
            if found is not None:
                return found, key + (f"][{inner!r}" if inner else "")
    return None, ""


def _strip(state: dict[str, torch.Tensor], wanted: set[str]) -> dict[str, torch.Tensor]:
    """Drop wrapper prefixes (in any nesting, e.g. module._orig_mod.) where that matches more model keys."""
    state = {k: v for k, v in state.items() if k not in WRAPPER_KEYS}
    best, score = state, len(wanted & set(state))
    for _ in range(4):  # wrappers nest a few deep at most
        prefix = next((p for p in PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
        if len(wanted & set(state)) > score:
            best, score = state, len(wanted & set(state))
    return best


def classifier_name(model: nn.Module, num_classes: int) -> str | None:
    """The module that writes the logits: the last Linear (else 1x1 Conv) with num_classes outputs."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and module.out_features == num_classes:
            found = name
        elif isinstance(module, nn.Conv2d) and module.out_channels == num_classes and found is None:
            found = name
    return found


def _names(keys, n: int = 3) -> str:
    keys = list(keys)
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def load_weights(model: nn.Module, path: str | os.PathLike, *, num_classes: int, model_name: str = "the model",
                 reinit_classifier: bool = False) -> dict:
    """Load the weights file into `model` (in place, strictly); returns what was loaded, for the manifest.

    With `reinit_classifier`, a classifier whose class count differs from the data's keeps the
    model's fresh initialisation (fine-tuning a model trained on other classes); without it, that
    is an error that says so.
    """
    path = Path(path)
    state, info = read_state_dict(path)
    if bad := nonfinite_tensors(state):
        raise CheckpointError(f"{path}: {len(bad)} tensors hold NaN or inf (e.g. {bad[0]}): the model diverged")
    state = _strip(state, set(model.state_dict()))
    head = classifier_name(model, num_classes)
    theirs = state.get(f"{head}.weight") if head is not None else None
    skipped = []
    if theirs is not None and theirs.shape[0] != num_classes:
        if not reinit_classifier:
            raise CheckpointError(f"{path}: the weights classify {theirs.shape[0]} classes and the data has "
                                  f"{num_classes} ({head}.weight {list(theirs.shape)}); set reinit_classifier: true "
                                  f"to start {head} afresh and fine-tune")
        skipped = [k for k in (f"{head}.weight", f"{head}.bias") if k in state]
        state = {k: v for k, v in state.items() if k not in skipped}
    if info.get("shapes"):  # a compress model.pt of a pruned model: shrink the layers first
        shapes = {k: v for k, v in info["shapes"].items() if not (skipped and k == head)}
        reshape_to(model, shapes, state)
    own = model.state_dict()
    # Old checkpoints predate BatchNorm's num_batches_tracked; its absence changes nothing in eval.
    missing = [k for k in own if k not in state and k not in skipped and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shape = next((k for k in state if k in own and state[k].shape != own[k].shape), None)
    if missing or unexpected or shape:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing ({_names(missing)})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected ({_names(unexpected)})")
        if shape:
            parts.append(f"first shape mismatch {shape}: file {list(state[shape].shape)} vs model "
                         f"{list(own[shape].shape)}")
        raise CheckpointError(f"{path}: weights do not fit {model_name}: {'; '.join(parts)}")
    for k, v in state.items():
        if not v.is_floating_point() and own[k].is_floating_point():
            raise CheckpointError(f"{path}: {k} is {v.dtype}, expected floating point")
    model.load_state_dict({k: v.to(own[k].dtype) for k, v in state.items()}, strict=False)
    return {"weights": str(path), "weights_format": info["format"], "reinitialised": skipped}


def start_from(model: nn.Module, stage_cfg, ctx) -> dict:
    """`weights:` on a train or distill stage: load them before training (fine-tuning); {} without them."""
    if getattr(stage_cfg, "weights", None) is None:
        return {}
    from compress.config import weights_path

    loaded = load_weights(model, weights_path(stage_cfg.weights, ctx.base_dir), num_classes=ctx.data.num_classes,
                          model_name=repr(stage_cfg.model), reinit_classifier=stage_cfg.reinit_classifier)
    ctx.log(f"[{ctx.stage_name}] starting from {loaded['weights']} ({loaded['weights_format']})"
            + (f", {' and '.join(loaded['reinitialised'])} afresh" if loaded["reinitialised"] else ""))
    return {"start_from": loaded}
