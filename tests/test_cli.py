import fcntl
import os
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

HEAVY = ("torch", "transformers", "faiss", "flwr", "sentence_transformers", "fastapi", "peft", "opacus")


def listed_commands(help_text: str) -> list[str]:
    """The first word of each row of the help's "Commands" panel (not words anywhere in the help)."""
    rows, inside = [], False
    for line in help_text.splitlines():
        if "Commands" in line and line.lstrip().startswith("╭"):
            inside = True
        elif inside and line.lstrip().startswith("╰"):
            break
        elif inside and line.strip().strip("│").strip():
            rows.append(line.strip().strip("│").split()[0])
    return rows


def test_console_script_help_lists_exactly_the_commands():
    result = subprocess.run(
        [sys.executable, "-m", "pfi_rag", "--help"],
        capture_output=True,
        text=True,
        check=False,
        env={**os.environ, "COLUMNS": "120"},
    )

    assert result.returncode == 0, result.stderr
    assert sorted(listed_commands(result.stdout)) == sorted(COMMANDS)


@pytest.mark.parametrize("command", COMMANDS)
def test_every_subcommand_has_its_own_help(command):
    result = CliRunner().invoke(app, [command, "--help"], prog_name="pfi-rag", env={"COLUMNS": "120"})

    assert result.exit_code == 0, result.output
    usage = next(line for line in result.output.splitlines() if "Usage:" in line)
    assert usage.split()[1:3] == ["pfi-rag", command]


def test_bad_set_flag_exits_2():
    result = CliRunner().invoke(app, ["--set", "no-equals-sign", "config", "show"])
    assert result.exit_code == 2
    assert "KEY=VALUE" in result.output


@pytest.mark.parametrize(
    "args",
    [
        ["--help"],
        ["config", "show"],
        ["clients", "create", "client-07"],
        ["docs", "--client", "client-07", "list"],
    ],
)
def test_commands_that_need_no_model_import_no_model_library(tmp_path, args):
    # Prepare: the command runs as in a shell, then reports which heavy libraries it loaded.
    script = (
        "import sys\n"
        "from pfi_rag.cli import app\n"
        "try:\n"
        f"    app({['--data-root', str(tmp_path / 'pfi-data'), *args]!r})\n"
        "except SystemExit as exit:\n"
        "    code = exit.code\n"
        f"heavy = sorted(name for name in {HEAVY!r} if name in sys.modules)\n"
        "print('HEAVY=' + ','.join(heavy)); print('CODE=' + str(code))\n"
    )

    # Execute
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=False)

    # Assert
    assert "CODE=0" in result.stdout, result.stdout + result.stderr
    assert "HEAVY=\n" in result.stdout, result.stdout


def test_search_names_the_http_route_when_a_server_holds_the_store(tmp_path):
    # Prepare: hold the client's store lock as a running `pfi-rag serve` does.
    index = tmp_path / "pfi-data" / "clients" / "client-00" / "index"
    index.mkdir(parents=True)
    fd = os.open(index / "lock", os.O_RDWR | os.O_CREAT, 0o600)
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        # Execute
        result = CliRunner().invoke(
            app,
            ["--data-root", str(tmp_path / "pfi-data"), "--set", "serving.port=8123",
             "search", "--client", "client-00", "Where do I live?"],
        )
    finally:
        os.close(fd)

    # Assert: exit 2 with what to do instead, before any model was loaded.
    assert result.exit_code == 2, result.output
    assert "pfi-rag serve" in result.output
    assert "http://127.0.0.1:8123/v1/clients/client-00/search" in result.output
