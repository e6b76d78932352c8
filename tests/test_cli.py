import subprocess
import sys

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app

COMMANDS = [
    "config",
    "data",
    "ingest",
    "search",
    "docs",
    "train",
    "privacy",
    "federate",
    "deploy",
    "serve",
    "clients",
    "generate",
    "probe",
    "calibrate-probes",
    "bench",
    "demo",
]


def test_console_script_help_runs_in_a_real_process():
    result = subprocess.run(
        [sys.executable, "-m", "pfi_rag", "--help"], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    for command in COMMANDS:
        assert command in result.stdout


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_help(command):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert "Usage" in result.output


def test_bad_set_flag_exits_2():
    result = CliRunner().invoke(app, ["--set", "no-equals-sign", "config", "show"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output
