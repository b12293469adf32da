"""Every shell command in the README runs as written on a fresh clone after `make run`.

The commands are not run (they train models); each one is parsed the way its program would
parse it, and everything it reads must exist: files that a clone holds (git-tracked), or that
`make run` makes (`.venv/`, `runs/<name>/<stage>/`, `reports/<name>/`); Makefile targets,
`compress` subcommands and options, pipeline stages named by `--force`, `--set stages.X...`
and `--artifact`, and pyproject extras. Relative links in the README must point at tracked files.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import tomllib
from pathlib import Path

import pytest
import typer
import yaml

from compress.cli import app

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DEFAULT_PIPELINE = "pipelines/distill.yaml"   # what `make run` runs
REPORT_FILES = {"report.json", "report.md", "report.html", "pareto.png", "layers"}
# parameters that name something a command writes, not something it reads
OUTPUTS = {("run", "out"), ("run", "reports"), ("compare", "plot"), ("deploy", "out"), ("sweep", "out")}


def tracked() -> set[str]:
    try:
        files = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
        names = set(files.split())
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk
        names = {p.relative_to(ROOT).as_posix() for p in ROOT.rglob("*") if p.is_file() and ".venv" not in p.parts}
    dirs = {"/".join(Path(n).parts[:i]) for n in names for i in range(1, len(Path(n).parts))}
    return names | dirs


TRACKED = tracked()


def pipeline_stages(name_or_file: str) -> tuple[str, list[str]]:
    cfg = yaml.safe_load((ROOT / name_or_file).read_text())
    return cfg["name"], list(cfg["stages"])


DEFAULT_NAME, DEFAULT_STAGES = pipeline_stages(DEFAULT_PIPELINE)


def readme_commands(text: str) -> list[str]:
    """The commands of the README's ```bash blocks, continuation lines joined, comments dropped."""
    commands = []
    for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(words)
    return commands


MADE: set[str] = set()  # what earlier README commands wrote (`deploy --out dist/x`, then `serve dist/x`)


def exists_after_make_run(path: str) -> bool:
    p = Path(path)
    if any(p == Path(m) or Path(m) in p.parents for m in MADE):
        return True
    if p.is_absolute():
        return False  # a README command may read only what the clone and `make run` provide
    parts = p.parts
    if p.as_posix().rstrip("/") in TRACKED:
        return True
    if parts[0] == ".venv":
        return True  # made by `make setup`, which `make run` runs first
    if parts[:2] == ("runs", DEFAULT_NAME):
        return len(parts) == 2 or parts[2] in DEFAULT_STAGES
    if parts[:2] == ("reports", DEFAULT_NAME):
        return len(parts) == 2 or parts[2] in REPORT_FILES
    return False


def stages_of_source(path: str) -> list[str]:
    """The stages of the run behind a run directory, report directory or report.json."""
    p = Path(path)
    parts = p.parts[:-1] if p.name == "report.json" else p.parts
    if parts[0] in ("runs", "reports") and parts[-1] == DEFAULT_NAME:
        return DEFAULT_STAGES
    report = ROOT / Path(*parts) / "report.json"
    if report.is_file():
        import json

        return list(json.loads(report.read_text())["pipeline"]["config"]["stages"])
    raise AssertionError(f"{path}: cannot tell which pipeline this is")


def check_compress(args: list[str]) -> list[str]:
    """Problems with one `compress ...` command line, parsed by the real CLI."""
    group = typer.main.get_command(app)
    if not args or args[0].startswith("-"):
        return []
    name, rest = args[0], args[1:]
    if name not in group.commands:
        return [f"compress {name}: no such command"]
    cmd = group.commands[name]
    try:
        ctx = cmd.make_context(name, list(rest), resilient_parsing=False)
    except Exception as exc:  # typer vendors its own click: its UsageError is not `click.UsageError`
        if type(exc).__name__ == "Exit":
            return []
        if not hasattr(exc, "format_message"):
            raise
        return [f"compress {' '.join(args)}: {exc.format_message()}"]
    problems = []
    for param in cmd.params:
        value = ctx.params.get(param.name)
        if value is None or (name, param.name) in OUTPUTS:
            if value is not None and set(getattr(param, "opts", ())) & set(rest):  # given, not a default
                MADE.add(str(value))
            continue
        for v in value if isinstance(value, (list, tuple)) else [value]:
            if isinstance(v, Path) and not exists_after_make_run(str(v)):
                problems.append(f"compress {name}: {param.name} {v}: not in a fresh clone after make run")
    stages: list[str] = []
    if name in ("run", "validate"):
        stages = pipeline_stages(str(ctx.params["pipeline"]))[1] if exists_after_make_run(
            str(ctx.params["pipeline"])) else []
    elif name == "deploy":
        stages = stages_of_source(str(ctx.params["source"]))
    named = list(ctx.params.get("force") or []) if name == "run" else []
    named += [s.split("=", 1)[0].split(".")[1] for s in ctx.params.get("set") or [] if s.startswith("stages.")]
    if name == "deploy":
        named.append(ctx.params["artifact"])
    problems += [f"compress {name}: no stage {s!r} in that pipeline" for s in named if s not in stages]
    return problems


def make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def check(words: list[str]) -> list[str]:
    prog = Path(words[0]).name
    if words[0].startswith(".venv/bin/"):
        words = [prog] + words[1:]
    if prog == "make":
        return [f"make {t}: no such target" for t in words[1:] if "=" not in t and t not in make_targets()]
    if prog == "compress":
        return check_compress(words[1:])
    if prog == "torchrun":  # torchrun ... -m compress ARGS
        i = words.index("-m")
        assert words[i + 1] == "compress"
        return check_compress(words[i + 2:])
    if prog in ("python", "python3") and len(words) > 1 and not words[1].startswith("-"):
        return [] if exists_after_make_run(words[1]) else [f"{words[1]}: no such file"]
    if prog == "source":
        return [] if exists_after_make_run(words[1]) else [f"{words[1]}: no such file"]
    if prog == "curl":  # a request to a local `compress serve`, with the user's own image
        return [] if any(w.strip("'").startswith("http://127.0.0.1:") for w in words) else ["curl: not to localhost"]
    if prog == "pip":
        extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        problems = []
        for w in words[2:]:
            m = re.fullmatch(r"\.\[([\w,-]+)\]", w)
            if m:
                problems += [f"pip: no extra {e!r}" for e in m.group(1).split(",") if e not in extras]
        return problems
    return [f"{prog}: a command this test does not know how to check"]


COMMANDS = readme_commands(README.read_text())


def test_the_readme_has_commands():
    progs = {Path(c[0]).name for c in COMMANDS}
    assert {"make", "compress"} <= progs and len(COMMANDS) > 10


def test_readme_commands_in_order():
    """In README order, so that a command may read what an earlier one wrote."""
    MADE.clear()
    problems = {" ".join(words): p for words in COMMANDS if (p := check(words))}
    assert not problems, problems


def test_the_checker_catches_what_used_to_be_wrong():
    MADE.clear()
    assert check(shlex.split("compress compare reports/base reports/fashion-distill"))
    assert check(shlex.split("compress run pipelines/distill.yaml --force mnv2-int9"))
    assert check(shlex.split("compress run pipelines/nope.yaml"))
    assert check(shlex.split("compress deploy reports/fashion-distill --artifact nope --target onnx --out d"))
    assert check(shlex.split("make bogus"))
    assert check(shlex.split("pip install -e '.[bogus]'"))
    assert check(shlex.split("compress run pipelines/distill.yaml --no-such-flag"))
    assert check(shlex.split("compress compare runs/fashion-distill/nostage"))
    assert not check(shlex.split("compress run pipelines/distill.yaml --force mnv2-int8 --out /tmp/x"))


def test_readme_links_point_at_tracked_files():
    text = README.read_text()
    links = [m for m in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text) if "://" not in m]
    assert links
    missing = [link for link in links if link.rstrip("/") not in TRACKED]
    assert not missing, missing


def test_runs_leave_the_committed_reference_and_git_status_alone():
    """`make run` writes runs/<name>/ and reports/<name>/: ignored; the reference is tracked apart."""
    configs = [yaml.safe_load(p.read_text()) for p in (ROOT / "pipelines").glob("*.yaml")]
    names = sorted({c["name"] for c in configs if isinstance(c, dict) and "name" in c})
    paths = [f"{root}/{n}/{f}" for n in names for root, f in (("reports", "report.json"), ("runs", "teacher/model.pt"))]
    try:
        res = subprocess.run(["git", "check-ignore", "--no-index", *paths], cwd=ROOT, capture_output=True, text=True)
    except OSError:
        pytest.skip("no git")
    if res.returncode == 128:
        pytest.skip("not a git checkout")
    assert sorted(res.stdout.split()) == sorted(paths)
    assert f"reports/reference/{DEFAULT_NAME}/report.json" in TRACKED
    ref = subprocess.run(["git", "check-ignore", "--no-index", f"reports/reference/{DEFAULT_NAME}/report.json"],
                         cwd=ROOT, capture_output=True, text=True)
    assert ref.returncode == 1  # not ignored
