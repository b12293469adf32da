"""compress: turn a big, accurate vision model into small, fast ones, with the numbers to prove it."""

from pathlib import Path

__version__ = "0.1.0"

# `compress` on PyPI is an unrelated project (a different author, also imported as `compress`),
# so this one is distributed as `compress-vision`; the command and the import name stay `compress`.
# The two cannot share an environment: both would own the `compress/` package directory.
DIST_NAME = "compress-vision"


def install_hint(extra: str) -> str:
    """The pip command that adds an optional extra to *this* project, never to PyPI's `compress`.

    From a source checkout (the usual editable install) that is the checkout's own path, so the
    command works from any directory; otherwise the distribution name.
    """
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    try:
        if f'name = "{DIST_NAME}"' in pyproject.read_text(encoding="utf-8"):
            return f"pip install -e '{root}[{extra}]'"
    except OSError:
        pass
    return f"pip install '{DIST_NAME}[{extra}]'"
