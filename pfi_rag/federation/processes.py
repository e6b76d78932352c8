"""Flower's own processes, started and stopped for pfi-rag: a SuperLink, SuperNodes, ``flwr`` calls.

Shared by the simulation launcher (:mod:`pfi_rag.federation.simulation`) and the deployment on
loopback (:mod:`pfi_rag.federation.deploy`). Every process writes to its own log file; every
``flwr`` call reads a Flower config from a private ``FLWR_HOME``, so the user's ``~/.flwr`` is
never touched. The Flower app directory holds only a pyproject: the ServerApp and ClientApp come
from the installed pfi_rag package.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import tomli_w

from pfi_rag.config import Config
from pfi_rag.storage import atomic_write_text

if TYPE_CHECKING:
    from pfi_rag.federation.certificates import DeploymentKeys

# The run config keys are Flower's (strings, numbers, booleans only); every one must be declared
# here, or `flwr run --run-config` refuses it. The launcher-only keys are empty in a deployment.
APP_PYPROJECT = """\
[build-system]
requires = ["setuptools>=69"]
build-backend = "setuptools.build_meta"

[project]
name = "pfi-rag-federation"
version = "0.1.0"
description = "pfi-rag's federated DP personalization (apps live in the installed pfi_rag package)"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "pfi-rag"

[tool.flwr.app.components]
serverapp = "{serverapp}"
clientapp = "{clientapp}"

[tool.flwr.app.config]
data-root = ""
config-file = ""
run-dir = ""
client-mods = ""
hold-rounds = false
launcher-pid = 0
"""

APPS = ("pfi_rag.federation.server_app:app", "pfi_rag.federation.client_app:app")  # (ServerApp, ClientApp)


def app_pyproject(apps: tuple[str, str] = APPS) -> str:
    """The Flower app's pyproject.toml, naming the ServerApp and ClientApp as ``module:attribute``."""
    return APP_PYPROJECT.replace("{serverapp}", apps[0]).replace("{clientapp}", apps[1])


CONNECTION = "pfi-local"  # the SuperLink connection's name in the private Flower config


class FlowerProcessFailed(RuntimeError):
    """A Flower process did not start, or a ``flwr`` call did not do what it was asked."""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def flower_bin(name: str) -> str:
    # The Flower executables sit next to this interpreter (the project's virtualenv).
    return str(Path(sys.executable).parent / name)


def flower_env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink spawns `flower-superexec`, `flwr-serverapp` and `flwr-simulation` by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"  # no network call from a local run
    # These processes write to log files: keep Flower's INFO there even when the CLI quiets the screen.
    env["FLWR_LOG_LEVEL"] = "INFO"
    return env


@contextmanager
def managed_process(
    command: list[str], log_path: Path, env: dict[str, str], *, own_session: bool = True
) -> Iterator[subprocess.Popen]:
    """Run ``command`` with its output in ``log_path``; stopped (TERM, then KILL) on leaving.

    ``own_session=False`` keeps the process in the caller's process group, so a signal to the
    caller's group (Ctrl-C, or a kill of the whole group) reaches it too; Flower's helpers
    (SuperExec, the ServerApp and simulation processes) watch their parent and exit with it.
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:  # this start's output only
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=own_session
        )
    try:
        yield process
    finally:
        stop(process, group=own_session)


def stop(process: subprocess.Popen, grace_s: float = 10.0, *, group: bool = True) -> None:
    if process.poll() is not None:
        return
    send = (lambda sig: os.killpg(process.pid, sig)) if group else process.send_signal
    send(signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        send(signal.SIGKILL)
        process.wait()


def wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise FlowerProcessFailed(f"{log_path.stem} exited with {process.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.1)
    raise FlowerProcessFailed(f"{log_path.stem} did not listen on port {port} within {timeout_s:.0f} s")


def write_run_files(
    cfg: Config, base: Path, address: str, ca_cert: Path | None = None, *, apps: tuple[str, str] = APPS
) -> tuple[Path, Path, Path]:
    """The Flower app directory, the effective pfi-rag config, and a private Flower config.

    ``ca_cert``: the SuperLink serves TLS and ``flwr`` checks it against this CA certificate.
    ``apps``: the ServerApp and ClientApp (pfi-rag's; a benchmark names bare ones).
    """
    app_dir = base / "app"
    atomic_write_text(app_dir / "pyproject.toml", app_pyproject(apps))
    config_file = base / "pfi-rag.toml"
    atomic_write_text(config_file, tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    flwr_home = base / "flwr-home"
    link = (
        {"address": address, "insecure": True}
        if ca_cert is None
        else {
            "address": address,
            "root-certificates": str(ca_cert),
        }
    )
    connection = {"superlink": {"default": CONNECTION, CONNECTION: link}}
    atomic_write_text(flwr_home / "config.toml", tomli_w.dumps(connection))
    return app_dir, config_file, flwr_home


def superlink_command(
    port: int,
    database: Path | None,
    keys: DeploymentKeys | None = None,
    host: str = "127.0.0.1",
    *,
    simulation: bool = False,
) -> list[str]:
    """``flower-superlink`` on ``host:port`` (one HTTP port serves the Fleet, Control and Runtime APIs).

    ``keys``: serve TLS with their server certificate, and admit only registered SuperNodes.
    ``simulation``: Flower's simulation runtime runs the ClientApps (no SuperNodes connect).
    ``database`` None: the SuperLink's state lives in memory and goes with the process.
    """
    security = (
        ["--insecure"]
        if keys is None
        else [
            "--ssl-ca-certfile",
            str(keys.ca_cert),
            "--ssl-certfile",
            str(keys.server_cert),
            "--ssl-keyfile",
            str(keys.server_key),
            "--enable-supernode-auth",
        ]
    )
    command = [flower_bin("flower-superlink"), *security]
    if simulation:
        command += ["--simulation", "--isolation", "subprocess"]
    command += ["--host", host, "--port", str(port), "--disable-runtime-dependency-installation"]
    if database is not None:
        command += ["--database", str(database)]
    return command


def run_config_file(path: Path, values: dict[str, str | bool | int | float]) -> Path:
    """``values`` as a TOML file for ``flwr run --run-config`` (no quoting of paths on a command line)."""
    atomic_write_text(path, tomli_w.dumps(values))
    return path


def submit_run(
    app_dir: Path,
    run_config: Path,
    env: dict[str, str],
    *,
    federation_config: str | None = None,
) -> int:
    """``flwr run``: submit the app to the SuperLink; the run's id."""
    command = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", str(run_config)]
    if federation_config is not None:
        command += ["--federation-config", federation_config]
    submitted = subprocess.run(
        [*command, "--format", "json"], capture_output=True, text=True, env=env, check=False
    )
    try:
        reply = json.loads(submitted.stdout[submitted.stdout.index("{") :])
        return int(reply["run-id"])
    except (ValueError, KeyError, TypeError):
        raise FlowerProcessFailed(
            f"flwr run did not start a run: {submitted.stdout}{submitted.stderr}".strip()
        ) from None


def run_status(run_id: int | None, env: dict[str, str]) -> dict:
    """``flwr ls --run-id``: the run's row (``status`` is ``finished:completed`` when it went well);
    empty when the SuperLink did not answer. ``run_id`` None: the first run the SuperLink lists."""
    selected = [] if run_id is None else ["--run-id", str(run_id)]
    listed = subprocess.run(
        [flower_bin("flwr"), "ls", CONNECTION, *selected, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        runs = json.loads(listed.stdout[listed.stdout.index("{") :]).get("runs", [])
    except ValueError:
        runs = []
    return runs[0] if runs else {}


def wait_for_run(run_id: int, env: dict[str, str], timeout_s: float, poll_s: float = 2.0) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = run_status(run_id, env)
        if str(status.get("status", "")).startswith("finished"):
            return status
        time.sleep(poll_s)
    raise FlowerProcessFailed(f"run {run_id} did not finish within {timeout_s:.0f} s")
