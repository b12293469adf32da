"""A deploy bundle, opened for serving: its manifest checked, its files verified, its preprocessing.

The bundle's `manifest.json` (written by `compress deploy`, format `compress.deploy/1`) is the
contract: the sha256 of every shipped file, the labels, and the preprocessing the model was
trained with. A server must not answer with a model other than the one the manifest names, so
every listed file is hashed at start and any difference refuses the bundle.

The preprocessing here is the bundle's own `infer.py`, step for step, on bytes instead of a
path: the image in the manifest's channel mode, bilinear-resized to its size (or, with
`resize`, its shorter side to `resize` and the centre cropped to size, as torchvision's Resize +
CenterCrop), then `x = (pixel * scale - mean[c]) / std[c]`, NCHW float32. The tests hold the two
to the same predictions. A manifest asking for a step this module does not know is refused at
start rather than served with the wrong preprocessing.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import warnings
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np

FORMAT_PREFIX = "compress.deploy/"
MODES = {1: "L", 3: "RGB", 4: "RGBA"}   # Pillow mode for a channel count, as infer.py maps them
# Each runtime's model files, first found first: in a flat bundle (onnx, jetson, openvino) or a Triton
# model directory. OpenVINO reads its IR, or else the ONNX.
MODEL_FILES = {"onnxruntime": ("model.onnx", "1/model.onnx"),
               "openvino": ("model.xml", "1/model.xml", "model.onnx", "1/model.onnx")}
MAX_PIXELS = 4096 * 4096   # a decoded image larger than this is refused before Pillow allocates it
RESIZE_MODES = ("shorter_side_center_crop",)


class BundleError(ValueError):
    """A bundle that cannot be served; one line for the user."""


class ImageError(ValueError):
    """An upload that is not a usable image; `status` is the HTTP code, `reason` a short slug."""

    def __init__(self, message: str, status: int = 400, reason: str = "not_an_image"):
        super().__init__(message)
        self.status, self.reason = status, reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class Preprocess:
    """The manifest's `preprocess`: uint8 image -> normalized float32 CHW."""

    channels: int
    height: int
    width: int
    scale: float
    mean: np.ndarray = field(repr=False)   # (C, 1, 1) float32
    std: np.ndarray = field(repr=False)
    resize: int | None = None              # shorter side to this, then the centre (height, width) crop

    @property
    def mode(self) -> str:
        return MODES[self.channels]

    @classmethod
    def from_manifest(cls, pre: object, where: str) -> Preprocess:
        if not isinstance(pre, dict):
            raise BundleError(f"{where}: 'preprocess' is missing or not an object")
        try:
            c = pre["channels"]
            h, w = pre["size"]
            scale, mean, std = pre["scale"], pre["mean"], pre["std"]
        except (KeyError, TypeError, ValueError):
            raise BundleError(f"{where}: 'preprocess' needs channels, size [H, W], scale, mean and std") from None
        if type(c) is not int or c not in MODES:
            raise BundleError(f"{where}: preprocess channels {c!r}: expected 1, 3 or 4")
        if not all(type(v) is int and 0 < v <= 8192 for v in (h, w)):
            raise BundleError(f"{where}: preprocess size {pre['size']!r}: expected two positive integers")
        numbers = [scale, *(mean if isinstance(mean, list) else []), *(std if isinstance(std, list) else [])]
        if not (isinstance(mean, list) and isinstance(std, list) and len(mean) == len(std) == c
                and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in numbers)
                and all(v > 0 for v in std)):
            raise BundleError(f"{where}: preprocess mean and std must be {c} finite numbers each (std > 0), "
                              f"scale a finite number")
        layout, dtype, resize = pre.get("layout", "NCHW"), pre.get("dtype", "float32"), pre.get("resize")
        if layout != "NCHW" or dtype != "float32":
            raise BundleError(f"{where}: preprocess layout {layout!r}, dtype {dtype!r}: this server feeds NCHW float32")
        if resize is not None and not (type(resize) is int and 0 < resize <= 8192):
            raise BundleError(f"{where}: preprocess resize {resize!r}: expected a positive integer")
        if resize is not None and pre.get("resize_mode", RESIZE_MODES[0]) not in RESIZE_MODES:
            raise BundleError(f"{where}: preprocess resize_mode {pre['resize_mode']!r} is not one this server "
                              f"knows ({', '.join(RESIZE_MODES)}); serve it with a newer compress")
        return cls(c, h, w, float(scale), np.asarray(mean, dtype=np.float32).reshape(c, 1, 1),
                   np.asarray(std, dtype=np.float32).reshape(c, 1, 1), resize)

    def __call__(self, data: bytes, *, strict: bool = False, max_pixels: int = MAX_PIXELS) -> tuple[np.ndarray, dict]:
        """(CHW float32, what was done to the image). Raises ImageError with the HTTP status to answer."""
        from PIL import Image, UnidentifiedImageError

        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                img = Image.open(io.BytesIO(data))
                w, h = img.size
                if w * h > max_pixels:
                    raise ImageError(f"the image is {w}x{h} pixels; at most {max_pixels:,} are accepted",
                                     413, "image_too_large")
                img.load()   # decode now: a truncated or corrupt file fails here, not later
        except ImageError:
            raise
        except (Image.DecompressionBombError, Image.DecompressionBombWarning):
            raise ImageError(f"the image is larger than the {max_pixels:,} pixels accepted", 413,
                             "image_too_large") from None
        except UnidentifiedImageError:
            raise ImageError("the body is not an image Pillow can read (PNG, JPEG, BMP, GIF, TIFF, WebP, ...)") from None
        except (OSError, ValueError, SyntaxError, EOFError) as exc:
            raise ImageError(f"the image could not be decoded ({' '.join(str(exc).split())[:120]})") from None
        source = {"size": [w, h], "mode": img.mode, "format": img.format}
        if w == 0 or h == 0:
            raise ImageError("the image has no pixels", 422, "bad_image")
        # With `resize` the manifest takes any size; otherwise another size is resized as infer.py does.
        wrong_size, wrong_mode = (w, h) != (self.width, self.height), img.mode != self.mode
        if strict and ((wrong_size and not self.resize) or wrong_mode):
            raise ImageError(f"expected a {self.width}x{self.height} {self.mode} image ({self.channels} channel"
                             f"{'s' if self.channels > 1 else ''}), got {w}x{h} {img.mode}; the server runs with "
                             f"--strict, so it does not convert", 422, "wrong_shape")
        if wrong_mode:
            try:
                img = img.convert(self.mode)
            except (ValueError, OSError) as exc:
                raise ImageError(f"a {img.mode} image cannot be converted to {self.mode} ({exc})", 422,
                                 "wrong_channels") from None
        resized = None
        if self.resize:
            img = self._resize_crop(img)
            resized = f"{w}x{h}->shorter side {self.resize}, centre {self.width}x{self.height}"
        elif wrong_size:
            img = img.resize((self.width, self.height), Image.Resampling.BILINEAR)
            resized = f"{w}x{h}->{self.width}x{self.height}"
        x = np.asarray(img, dtype=np.float32).reshape(self.height, self.width, self.channels).transpose(2, 0, 1)
        x = (x * np.float32(self.scale) - self.mean) / self.std
        done = {"converted": f"{source['mode']}->{self.mode}" if wrong_mode else None,
                "resized": resized}
        return x.astype(np.float32), {"input": source, **done}

    def _resize_crop(self, img):
        """torchvision Resize(resize) + CenterCrop(size) on a PIL image, as infer.py computes them."""
        from PIL import Image

        r, (iw, ih) = self.resize, img.size
        size = (r, int(r * ih / iw)) if iw <= ih else (int(r * iw / ih), r)
        if min(size) < 1:
            raise ImageError(f"a {iw}x{ih} image is too elongated to resize its shorter side to {r}", 422, "bad_image")
        if img.size != size:
            img = img.resize(size, Image.Resampling.BILINEAR)
        left, top = round((size[0] - self.width) / 2.0), round((size[1] - self.height) / 2.0)
        return img.crop((left, top, left + self.width, top + self.height))


@dataclass(frozen=True)
class Bundle:
    root: Path            # the directory holding manifest.json
    manifest: dict = field(repr=False)
    name: str             # the artifact (stage) name
    precision: str
    target: str
    models: dict[str, tuple[Path, str]] = field(repr=False)   # runtime -> (model file, its sha256)
    labels: list[str] = field(repr=False)
    preprocess: Preprocess
    input_name: str

    def describe(self) -> dict:
        art = self.manifest.get("artifact") or {}
        return {"name": self.name, "model": art.get("model"), "precision": self.precision, "target": self.target,
                "num_classes": len(self.labels),
                "input": {"channels": self.preprocess.channels, "height": self.preprocess.height,
                          "width": self.preprocess.width, "mode": self.preprocess.mode,
                          "resize": self.preprocess.resize}}


def _manifest_dir(path: Path) -> Path:
    """The directory with manifest.json: the bundle itself, or the one model in a Triton repository."""
    if (path / "manifest.json").is_file():
        return path
    inner = [p for p in sorted(path.iterdir()) if (p / "manifest.json").is_file()] if path.is_dir() else []
    if len(inner) == 1:
        return inner[0]
    if len(inner) > 1:
        raise BundleError(f"{path}: a model repository with {len(inner)} models "
                          f"({', '.join(p.name for p in inner)}); pass one of them")
    raise BundleError(f"{path}: not a deploy bundle (no manifest.json); make one with "
                      f"`compress deploy RUN --artifact A --target onnx --out DIR`")


def load_bundle(path: str | Path) -> Bundle:
    """Open and verify a bundle made by `compress deploy`; BundleError (one line) if it cannot be served."""
    path = Path(path)
    if not path.exists():
        raise BundleError(f"{path}: no such bundle directory")
    if not path.is_dir():
        raise BundleError(f"{path}: not a directory (a bundle is the directory `compress deploy --out` wrote)")
    root = _manifest_dir(path)
    where = str(root / "manifest.json")
    try:
        manifest = json.loads((root / "manifest.json").read_text())
    except (OSError, ValueError) as exc:
        raise BundleError(f"{where}: unreadable ({type(exc).__name__}: {' '.join(str(exc).split())[:120]})") from None
    if not isinstance(manifest, dict) or not str(manifest.get("format", "")).startswith(FORMAT_PREFIX):
        raise BundleError(f"{where}: not a compress deploy manifest (format {FORMAT_PREFIX}N)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files or not all(isinstance(v, str) for v in files.values()):
        raise BundleError(f"{where}: 'files' (the sha256 of every shipped file) is missing or malformed")
    for rel, digest in sorted(files.items()):
        parts = PurePosixPath(rel).parts
        if not rel or PurePosixPath(rel).is_absolute() or ".." in parts:
            raise BundleError(f"{where}: file entry {rel!r} points outside the bundle")
        file = root / rel
        if not file.is_file():
            raise BundleError(f"{root}: incomplete bundle, {rel} is missing (listed in manifest.json)")
        if _sha256(file) != digest:
            raise BundleError(f"{file}: sha256 differs from manifest.json (changed or partly copied); "
                              f"deploy the bundle again")
    models = {runtime: (root / rel, files[rel]) for runtime, names in MODEL_FILES.items()
              for rel in names[::-1] if rel in files}
    if not models:
        raise BundleError(f"{where}: the bundle ships no model this server runs "
                          f"({', '.join(sorted({n for names in MODEL_FILES.values() for n in names}))})")
    labels = manifest.get("labels")
    if not isinstance(labels, list) or not labels or not all(isinstance(v, str) for v in labels):
        raise BundleError(f"{where}: 'labels' must be a non-empty list of class names")
    art = manifest.get("artifact") if isinstance(manifest.get("artifact"), dict) else {}
    inp = manifest.get("input") if isinstance(manifest.get("input"), dict) else {}
    return Bundle(root=root, manifest=manifest, name=str(art.get("name") or root.name),
                  precision=str(manifest.get("precision", "?")), target=str(manifest.get("target", "?")),
                  models=models, labels=labels,
                  preprocess=Preprocess.from_manifest(manifest.get("preprocess"), where),
                  input_name=str(inp.get("name") or "input"))
