"""Usage errors, as a user meets them: the real console script, every command.

A mistyped command line prints click's short usage line and one ``Error:`` line, exits
with status 2 and shows no traceback, whatever the command (commands added later are
covered: the list comes from the app itself).
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
import typer.main

import vitqc
from vitqc.cli import app

COMMANDS = typer.main.get_command(app).commands
SCRIPT = shutil.which("vitqc", path=str(Path(sys.executable).parent)) or "vitqc"


def run_script(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([SCRIPT, *args], capture_output=True, text=True, timeout=60)


def assert_usage_error(proc: subprocess.CompletedProcess, needle: str) -> None:
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "Traceback" not in out, out
    errors = [line for line in proc.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, out
    assert needle in errors[0], out
    assert proc.stderr.startswith("Usage: vitqc"), out


def _numeric_option(command) -> str | None:
    """An option of the command typed int or float (optional or not), if it has one."""
    hints = typing.get_type_hints(command.callback)
    for param in command.params:
        hint = hints.get(param.name)
        if isinstance(hint, types.UnionType):
            hint = next((a for a in typing.get_args(hint) if a is not type(None)), None)
        if param.param_type_name == "option" and hint in (int, float):
            return param.opts[0]
    return None


def _required_arguments(command) -> list[str]:
    return [p.name for p in command.params if p.param_type_name == "argument" and p.required]


def test_unknown_command():
    assert_usage_error(run_script("nosuchcmd"), "No such command 'nosuchcmd'")


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_unknown_option(name):
    assert_usage_error(run_script(name, "--nosuch"), "No such option: --nosuch")


@pytest.mark.parametrize("name", sorted(n for n, c in COMMANDS.items() if _required_arguments(c)))
def test_missing_argument(name):
    assert_usage_error(run_script(name), "Missing argument")


@pytest.mark.parametrize("name", sorted(n for n, c in COMMANDS.items() if _numeric_option(c)))
def test_bad_parameter_value(name, tmp_path):
    command = COMMANDS[name]
    args = [str(tmp_path)] * len(_required_arguments(command))
    option = _numeric_option(command)
    proc = run_script(name, *args, option, "abc")
    assert_usage_error(proc, f"Invalid value for '{option}'")


def test_every_command_is_covered():
    # the parametrized cases above cover each kind of error on every command that can
    # have it; this pins the list so a command without any check would show up here
    assert {"fit", "evaluate", "predict", "benchmark", "tables", "report"} <= set(COMMANDS)
    assert _numeric_option(COMMANDS["fit"]) is not None
    assert _numeric_option(COMMANDS["recommend"]) is not None


def test_version():
    proc = run_script("--version")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"vitqc {vitqc.__version__}"


def test_minmax_flag_pair_reads_plainly():
    proc = run_script("fit", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "--minmax / --no-minmax" in proc.stdout
    assert "--no-no-minmax" not in proc.stdout
