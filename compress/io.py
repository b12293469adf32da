"""Atomic writes and the self-describing model file.

Every file the pipeline writes goes to a temp file in the same directory, is flushed and
fsync'd, then renamed over the target: a kill mid-save leaves the previous file whole.

A model file is a plain dict loadable with ``torch.load(weights_only=True)``: the registry
name and kwargs to rebuild the architecture, the state dict, and the shapes of every
conv/linear/norm layer, so that a pruned model (whose channel counts changed) is rebuilt
exactly. No pickled modules: a checkpoint from a stranger cannot run code. Every file is read
with ``torch.load(weights_only=True)``; one that needs pickle is refused, never retried unsafely.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

MODEL_FORMAT = "compress.model/1"
# Module attributes that define a layer's shape; pruning rewrites them together with the weights.
_SHAPE_ATTRS = ("in_channels", "out_channels", "groups", "in_features", "out_features", "num_features",
                "normalized_shape", "num_channels", "num_groups")


_UMASK = os.umask(0o022)  # read once (os.umask can only be read by setting it), then put back
os.umask(_UMASK)


class WriteError(OSError):
    """A file that could not be written (disk full, read-only, no permission); the old one is intact."""


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    path = Path(path)
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        kept = " (the previous file is unchanged)" if path.exists() else ""
        hint = "; free some space and run again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
        error = WriteError(f"cannot write {path}: {reason}{kept}{hint}")
        error.errno = exc.errno  # (no .filename: OSError would then print "[Errno N] ..." instead)
        raise error from None
    except BaseException:
        if tmp is not None:
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


_SHA256: dict[tuple, str] = {}   # (device, inode, size, mtime_ns) -> digest: files already read this process


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """The file's sha256. A run asks for the same files' hashes many times (cache keys, manifests,
    cache checks); a file is read again only when its inode, size or mtime changed (our writes are
    atomic renames, so a rewritten file is a new inode)."""
    st = os.stat(path)
    key = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
    if (digest := _SHA256.get(key)) is None:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while block := f.read(chunk):
                h.update(block)
        digest = _SHA256[key] = h.hexdigest()
    return digest


def _layer_shapes(model: nn.Module) -> dict[str, dict[str, Any]]:
    shapes = {}
    for name, module in model.named_modules():
        attrs = {a: getattr(module, a) for a in _SHAPE_ATTRS if hasattr(module, a)}
        attrs = {a: (list(v) if isinstance(v, tuple) else v) for a, v in attrs.items() if isinstance(v, (int, tuple))}
        if attrs:
            shapes[name] = attrs
    return shapes


def nonfinite_tensors(state: dict) -> list[str]:
    """Names of the floating-point tensors in a state dict that hold NaN or inf."""
    return [k for k, v in state.items()
            if isinstance(v, torch.Tensor) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save_model(model: nn.Module, path: str | os.PathLike, *, name: str, num_classes: int, in_channels: int,
               extra: dict | None = None) -> Path:
    if bad := nonfinite_tensors(model.state_dict()):  # a diverged model is an error, never an artifact
        raise FloatingPointError(f"{path}: refusing to save a model with non-finite weights "
                                 f"({len(bad)} tensors, e.g. {bad[0]})")
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


MAX_MODEL_BYTES = 8 << 30  # far above any model this tool trains; a bound, so a device file is not read forever


class CheckpointError(ValueError):
    """A model file that cannot be trusted or read; the message is meant for the user."""


def safe_load(path: str | os.PathLike, what: str = "model file") -> Any:
    """``torch.load(weights_only=True)`` with one-line errors: missing, truncated, or needing pickle."""
    path = Path(path)
    try:  # bytes first: a FIFO or device is refused, never read (torch.load would block on a FIFO)
        data = io.BytesIO(read_regular_file(path, MAX_MODEL_BYTES, what))
        return torch.load(data, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such {what}") from None
    except pickle.UnpicklingError as exc:
        # "Unsupported global": a pickled class or function (what weights_only exists to refuse). Any other
        # weights-only failure ("Unsupported operand 0", bad opcodes) is a damaged file, not a hostile one.
        if "Unsupported global" in str(exc):
            raise CheckpointError(f"{path}: refused: the {what} holds pickled Python objects (such as a whole "
                                  f"nn.Module), and unpickling can run arbitrary code; compress reads only plain "
                                  f"tensors and values (torch.load weights_only=True)") from None
        detail = next((line.strip() for line in str(exc).splitlines() if "Unsupported" in line),
                      (str(exc).splitlines() or [""])[0])[:160]
        raise CheckpointError(f"{path}: not a readable {what} (corrupt or truncated: {detail}); {_REDO}") from None
    except FileReadError as exc:
        raise CheckpointError(str(exc)) from None
    except Exception as exc:  # zip errors, EOF, bad magic: a damaged file
        first = str(exc).splitlines()[0].split(". ")[0][:160] if str(exc) else ""
        raise CheckpointError(f"{path}: not a readable {what} (corrupt or truncated: "
                              f"{type(exc).__name__}{': ' + first if first else ''}); {_REDO}") from None


_REDO = "delete it, or re-run the stage that wrote it with `compress run PIPELINE --force STAGE`"


def read_model_file(path: str | os.PathLike) -> dict:
    path = Path(path)
    payload = safe_load(path, "model file")
    if not isinstance(payload, dict) or payload.get("format") != MODEL_FORMAT:
        raise CheckpointError(f"{path}: not a compress model file (expected format {MODEL_FORMAT!r})")
    return payload


def load_model(path: str | os.PathLike, base_dir: Path | None = None) -> nn.Module:
    """Rebuild the architecture from the registry, reshape pruned layers, load the weights."""
    from compress.registry import create_model

    payload = read_model_file(path)
    model = create_model(payload["model"], num_classes=payload["num_classes"],
                         in_channels=payload["in_channels"], base_dir=base_dir)
    state = payload["state_dict"]
    reshape_to(model, payload["shapes"], state)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"{path}: weights do not fit model {payload['model']!r}: "
                              f"{str(exc).splitlines()[0][:200]}") from None
    return model


def reshape_to(model: nn.Module, shapes: dict, state: dict) -> None:
    """Give a freshly built model the layer shapes (a pruned model's) recorded in a model file."""
    modules = dict(model.named_modules())
    for mname, attrs in shapes.items():
        module = modules.get(mname)
        if module is None:
            continue
        for attr, value in attrs.items():
            if hasattr(module, attr):
                setattr(module, attr, tuple(value) if isinstance(value, list) else value)
    # Resize parameters and buffers to the saved shapes before loading (pruned layers shrank).
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


# ----------------------------------------------------------------------------- reading what users hand us

class FileReadError(ValueError):
    """A file that is not a regular file, is too large or cannot be read; one line for the user."""


def _size(n: int) -> str:
    return f"{n / (1 << 20):.1f} MiB" if n >= 1 << 20 else f"{n / 1024:.0f} KiB" if n >= 1024 else f"{n} bytes"


def read_regular_file(path: str | os.PathLike, max_bytes: int, what: str = "file") -> bytes:
    """The bytes of `path`, which must be a regular file of at most `max_bytes`.

    Opened non-blocking and checked with fstat on the open descriptor (no race between check and
    read): a FIFO, socket or device is refused at once instead of blocking or reading forever.
    FileNotFoundError propagates (callers word it); everything else is a FileReadError.
    """
    import stat

    path = Path(path)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            kind = ("a directory" if stat.S_ISDIR(st.st_mode) else "a FIFO (named pipe)" if stat.S_ISFIFO(st.st_mode)
                    else "a character device" if stat.S_ISCHR(st.st_mode) else "a block device"
                    if stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a file")
            raise FileReadError(f"{path}: is {kind}; the {what} must be a regular file")
        chunks, total = [], 0
        while total <= max_bytes and (block := os.read(fd, min(1 << 20, max_bytes + 1 - total))):
            chunks.append(block)
            total += len(block)
        if total > max_bytes:
            raise FileReadError(f"{path}: the {what} is larger than {_size(max_bytes)}, the most compress reads "
                                f"({_size(max(st.st_size, total))})")
        return b"".join(chunks)
    except OSError as exc:
        raise FileReadError(f"{path}: cannot read the {what}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


MAX_YAML_BYTES = 1 << 20      # the largest pipeline shipped is 3 KB
MAX_YAML_NODES = 50_000       # values after aliases are expanded: a 1 KB alias bomb expands to billions


class YAMLInputError(ValueError):
    """Malformed, duplicated or oversized YAML; `line` is 1-based (None: the whole document)."""

    def __init__(self, message: str, line: int | None = None):
        super().__init__(message)
        self.line = line


def _check_yaml_nodes(root, limit: int) -> None:
    """Duplicate keys (with both lines), recursive aliases, and more than `limit` values once aliases expand."""
    import yaml

    sizes: dict[int, int] = {}
    active: set[int] = set()

    def size(node) -> int:
        ident = id(node)
        if ident in sizes:  # an alias: the node again; its expanded size counts again
            return sizes[ident]
        if ident in active:
            raise YAMLInputError("an alias refers to the node that contains it (a recursive structure)",
                                 node.start_mark.line + 1)
        active.add(ident)
        n = 1
        if isinstance(node, yaml.SequenceNode):
            n += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    first = seen.setdefault((key.tag, key.value), key)
                    if first is not key:
                        shown = key.value if len(key.value) <= 40 else key.value[:39] + "\u2026"
                        raise YAMLInputError(f"duplicate key {shown!r} (first at line {first.start_mark.line + 1}); "
                                             f"a key may appear once in a mapping", key.start_mark.line + 1)
                n += size(key) + size(value)
        active.discard(ident)
        sizes[ident] = n
        if n > limit:
            raise YAMLInputError(f"more than {limit} values once aliases are expanded (an alias bomb?)",
                                 node.start_mark.line + 1)
        return n

    size(root)


def load_yaml(text: str, max_nodes: int = MAX_YAML_NODES):
    """(data, root node) of one YAML document, safely: duplicate keys, recursive aliases and alias bombs
    are refused before anything is built. Raises YAMLInputError."""
    import yaml

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        if root is None:
            return None, None
        _check_yaml_nodes(root, max_nodes)
        return loader.construct_document(root), root
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise YAMLInputError(f"malformed YAML: {problem}", mark.line + 1 if mark is not None else None) from None
    except RecursionError:
        raise YAMLInputError("malformed YAML: nested too deeply") from None
    finally:
        loader.dispose()
