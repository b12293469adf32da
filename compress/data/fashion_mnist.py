"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017, arXiv:1708.07747): 28x28 grayscale, 60k train / 10k test.

The four IDX files (each plain or .gz) are looked for in order:
  1. data.root, and nowhere else when it is set;
  2. $COMPRESS_DATA, or its fashion-mnist/ subfolder;
  3. /usr/share/datasets/fashion-mnist (Debian's dataset-fashion-mnist package);
  4. ~/.cache/compress/fashion-mnist ($XDG_CACHE_HOME is honoured), downloaded there when
     data.download is true.
A folder holding only some of the files is an error (except the cache, which is completed).

Every file's decompressed bytes are checked against a known MD5: Debian re-gzipped the files,
so their .gz hashes differ from upstream's while the content is identical, and plain MNIST uses
the same file names. Downloads are also checked as .gz before they are kept.
"""

from __future__ import annotations

import hashlib
import os
import urllib.request
from pathlib import Path
from typing import Callable

from compress.config import DataConfig
from compress.data.idx import read_idx_pair
from compress.data.module import DataError, RawData
from compress.io import atomic_write_bytes

CLASS_NAMES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
MD5 = {  # of the decompressed files: the same whichever mirror or gzip produced them
    "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
    "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
    "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
    "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
}
GZ_MD5 = {  # of upstream's .gz files, checked before a download is kept
    "train-images-idx3-ubyte": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
    "train-labels-idx1-ubyte": "25c81989df183df01b3e8a0aad5dffbe",
    "t10k-images-idx3-ubyte": "bef4ecab320f06d8554ea6380940ec79",
    "t10k-labels-idx1-ubyte": "bb300cfdad3c16e7a12a480ee83cd310",
}
# The S3 website endpoint serves plain HTTP only; the MD5 check is what makes that safe.
MIRRORS = ("https://github.com/zalandoresearch/fashion-mnist/raw/master/data/fashion/",
           "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/")
ENV_VAR = "COMPRESS_DATA"
SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "compress" / "fashion-mnist"


def find_files(directory: Path) -> dict[str, Path]:
    """The standard files present in `directory`, plain preferred over .gz (no need to inflate)."""
    found = {}
    for name in FILES:
        for candidate in (directory / name, directory / f"{name}.gz"):
            if candidate.is_file():
                found[name] = candidate
                break
    return found


def _missing(directory: Path, found: dict[str, Path]) -> str:
    return f"{directory}: missing {', '.join(n for n in FILES if n not in found)} (plain or .gz) of Fashion-MNIST"


def locate(cfg: DataConfig, log: Callable[[str], None]) -> tuple[dict[str, Path], Path]:
    """The four files and the folder they came from, following the search order above."""
    if cfg.root is not None:
        root = Path(cfg.root).expanduser()
        if not root.is_dir():
            raise DataError(f"data.root {root}: no such directory")
        found = find_files(root)
        if len(found) < len(FILES):
            raise DataError(_missing(root, found))
        return found, root

    searched = []
    if env := os.environ.get(ENV_VAR):
        if not Path(env).expanduser().is_dir():
            raise DataError(f"${ENV_VAR}={env}: no such directory")
        searched += [Path(env).expanduser(), Path(env).expanduser() / "fashion-mnist"]
    searched.append(SYSTEM_DIR)
    for directory in searched:
        found = find_files(directory)
        if len(found) == len(FILES):
            return found, directory
        if found:
            raise DataError(_missing(directory, found))

    cache = cache_dir()
    found = find_files(cache)
    if len(found) < len(FILES):
        if not cfg.download:
            where = ", ".join(str(d) for d in [*searched, cache])
            raise DataError(f"Fashion-MNIST not found (looked in {where}); set data.root or ${ENV_VAR}, "
                            f"install dataset-fashion-mnist, or set data.download: true")
        for name in FILES:
            if name not in found:
                download(name, cache, log)
        found = find_files(cache)
    return found, cache


def download(name: str, directory: Path, log: Callable[[str], None], timeout: float = 60) -> Path:
    """Fetch `name`.gz into `directory` from the first mirror that serves the right bytes."""
    errors = []
    for mirror in MIRRORS:
        url = f"{mirror}{name}.gz"
        log(f"downloading {url}")
        try:
            with urllib.request.urlopen(url, timeout=timeout) as response:
                data = response.read()
        except Exception as exc:  # network errors come in many types; each mirror gets one line
            errors.append(f"{url}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        digest = hashlib.md5(data).hexdigest()
        if digest != GZ_MD5[name]:
            errors.append(f"{url}: checksum mismatch (MD5 {digest}, expected {GZ_MD5[name]})")
            continue
        return atomic_write_bytes(directory / f"{name}.gz", data)  # temp file, then rename
    raise DataError(f"could not download {name}.gz ({'; '.join(errors)}); put the four files in a folder "
                    f"and set data.root or ${ENV_VAR}")


def load(cfg: DataConfig, log: Callable[[str], None]) -> RawData:
    files, directory = locate(cfg, log)
    train_x, train_y = read_idx_pair(files[FILES[0]], files[FILES[1]], (MD5[FILES[0]], MD5[FILES[1]]))
    test_x, test_y = read_idx_pair(files[FILES[2]], files[FILES[3]], (MD5[FILES[2]], MD5[FILES[3]]))
    return RawData("fashion-mnist", CLASS_NAMES, train_x, train_y, test_x, test_y, source=str(directory))
