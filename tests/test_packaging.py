"""The distribution has a name of its own; every install hint installs this project.

`compress` on PyPI is an unrelated project (also imported as `compress`): a hint that says
`pip install 'compress[...]'` fetches it, and `-U` replaces this project with it.
"""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

import compress
from compress import DIST_NAME, install_hint

ROOT = Path(__file__).resolve().parent.parent
# `pip install compress`, `pip install 'compress[x]'`, `pip install "compress[x]"`, `-U compress`
WRONG_HINT = re.compile(r"""pip3? install\b[^\n`]*?(?<![\w./-])['"]?compress(\[[\w,]+\])?['"]?(?![\w.-])""")


def _pyproject() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_the_distribution_name_is_not_the_unrelated_one():
    project = _pyproject()["project"]
    assert project["name"] == DIST_NAME and DIST_NAME != "compress"
    assert project["scripts"]["compress"] == "compress.cli:app"  # the command keeps its name
    # self-references (dev pulls in tracking) name this distribution, never PyPI's `compress`
    extras = project["optional-dependencies"]
    refs = [r for deps in extras.values() for r in deps if r.split("[")[0] in ("compress", DIST_NAME)]
    assert refs and all(r.startswith(f"{DIST_NAME}[") for r in refs)
    # the environment running the tests has this project installed under its new name
    dist = importlib.metadata.distribution(DIST_NAME)
    assert dist.version == compress.__version__


def test_install_hint_points_at_this_checkout():
    hint = install_hint("tensorrt")
    assert hint == f"pip install -e '{ROOT}[tensorrt]'"  # runnable from any directory
    assert not WRONG_HINT.search(hint)


def test_the_pattern_catches_the_unrelated_project():
    for bad in ("pip install 'compress[tracking]'", 'pip install "compress[tensorrt]"',
                "pip install compress", "pip install -U compress"):
        assert WRONG_HINT.search(bad), bad
    for good in ("pip install -e '.[tracking]'", "pip install 'compress-vision[tracking]'",
                 "pip install -e '/src/compress[tensorrt]'", "pip install compress-vision"):
        assert not WRONG_HINT.search(good), good


def test_no_message_or_doc_suggests_installing_the_unrelated_project():
    files = [ROOT / "README.md", ROOT / "Makefile", *sorted((ROOT / "compress").rglob("*.py")),
             *sorted((ROOT / "compress").rglob("*.sh"))]
    hits = [f"{f.relative_to(ROOT)}: {m.group(0)}" for f in files if f.is_file()
            for m in WRONG_HINT.finditer(f.read_text(encoding="utf-8", errors="replace"))]
    assert not hits, hits


def test_supported_torch_range_covers_the_gpu_image_and_the_pin():
    from packaging.requirements import Requirement

    torch_req = next(Requirement(r) for r in _pyproject()["project"]["dependencies"] if r.startswith("torch>"))
    pinned = re.search(r"^torch==([\d.]+)$", (ROOT / "constraints.txt").read_text(), re.M).group(1)
    for version in ("2.11.0", pinned):  # the GPU image's torch, and the one the suite runs on
        assert torch_req.specifier.contains(version), version
    assert not torch_req.specifier.contains("2.10.0")
