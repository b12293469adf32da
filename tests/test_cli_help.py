"""`compress ... --help` shows what the source says: angle-bracket placeholders survive the
markdown rendering, and on/off flags are not shown with a `<bool>` value they do not take."""

from __future__ import annotations

import re

import pytest
import typer
from typer.testing import CliRunner

from compress.cli import app

COMMANDS = sorted(c.name or c.callback.__name__ for c in app.registered_commands)


def _help(*args: str) -> str:
    res = CliRunner().invoke(app, [*args, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert res.exit_code == 0, res.output
    return " ".join(res.output.split())


@pytest.mark.parametrize("command", COMMANDS)
def test_help_keeps_placeholders_and_shows_no_bool(command):
    text = _help(command)
    assert "<bool>" not in text
    info = typer.main.get_command(app).commands[command]
    for param in info.params:
        for placeholder in re.findall(r"<[a-z_]+>", getattr(param, "help", None) or ""):
            assert placeholder in text, (command, param.name, placeholder)


def test_run_help_names_the_stage_directory():
    text = _help("run")
    assert "OUT/<name>/<stage>/" in text and "OUT///" not in text
    assert re.search(r"--no-progress\s+No progress bars", text)  # a flag: no value shown
    assert re.search(r"--out\s+-o\s+<path>", text)                # an option still shows its value type


def test_top_level_help_has_no_bool():
    assert "<bool>" not in _help()
