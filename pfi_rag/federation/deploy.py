"""`pfi-rag deploy local`: the federation on Flower's Deployment Engine, as real processes.

One ``flower-superlink`` and one ``flower-supernode`` per client on loopback; the run is
submitted with ``flwr run`` against a Flower config written to a private ``FLWR_HOME``, so
the user's own ``~/.flwr`` is never touched. Each SuperNode is told its client id and data
root through its node config and reads nothing else. Across machines the same commands run
with TLS certificates instead of ``--insecure`` and SuperNode authentication (README).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from pfi_rag.config import Config
from pfi_rag.federation.checkpoint import federation_dir
from pfi_rag.storage import atomic_write_text, list_clients

logger = logging.getLogger(__name__)

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
serverapp = "pfi_rag.federation.server_app:app"
clientapp = "pfi_rag.federation.client_app:app"

[tool.flwr.app.config]
data-root = ""
config-file = ""
"""


class DeploymentFailed(RuntimeError):
    """A process did not start, or the run did not finish successfully."""


@dataclass
class Deployment:
    superlink_address: str
    flwr_home: Path
    app_dir: Path
    log_dir: Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _bin(name: str) -> str:
    # The Flower executables sit next to this interpreter (the project's virtualenv).
    return str(Path(sys.executable).parent / name)


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    # The SuperLink spawns `flower-superexec` and `flwr-serverapp` by name.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    return env


@contextmanager
def _process(command: list[str], log_path: Path, env: dict[str, str]):
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )
    try:
        yield process
    finally:
        _stop(process)


def _stop(process: subprocess.Popen, grace_s: float = 10.0) -> None:
    if process.poll() is not None:
        return
    os.killpg(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _wait_for_port(port: int, process: subprocess.Popen, log_path: Path, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise DeploymentFailed(f"{log_path.stem} exited with {process.returncode}; see {log_path}")
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise DeploymentFailed(f"{log_path.stem} did not listen on port {port} within {timeout_s:.0f} s")


def write_run_files(cfg: Config, base: Path, address: str) -> tuple[Path, Path, Path]:
    """The Flower app directory, the effective pfi-rag config, and a private Flower config."""
    app_dir = base / "app"
    atomic_write_text(app_dir / "pyproject.toml", APP_PYPROJECT)
    config_file = base / "pfi-rag.toml"
    atomic_write_text(config_file, tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    flwr_home = base / "flwr-home"
    connection = {"superlink": {"default": "pfi-local", "pfi-local": {"address": address, "insecure": True}}}
    atomic_write_text(flwr_home / "config.toml", tomli_w.dumps(connection))
    return app_dir, config_file, flwr_home


def run_deployment(cfg: Config, clients: int, timeout_s: float = 3600.0) -> dict:
    """Start SuperLink + one SuperNode per client, run the federation, stop them; the run's status."""
    client_ids = list_clients(cfg.data_root)[:clients]
    if len(client_ids) < clients:
        raise ValueError(f"{cfg.data_root} holds {len(client_ids)} clients; run `pfi-rag data synth` first")
    cfg = cfg.model_copy(deep=True)
    cfg.data_root = Path(cfg.data_root).resolve()
    cfg.federation.clients = clients
    base = federation_dir(cfg.data_root) / "deploy"
    log_dir = base / "logs"
    port = free_port()
    address = f"127.0.0.1:{port}"
    app_dir, config_file, flwr_home = write_run_files(cfg, base, address)
    env = _env(flwr_home)
    with ExitStack() as stack:
        superlink = stack.enter_context(
            _process(
                [
                    _bin("flower-superlink"),
                    "--insecure",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--disable-runtime-dependency-installation",
                    "--database",
                    str(base / "superlink.db"),
                ],
                log_dir / "superlink.log",
                env,
            )
        )
        _wait_for_port(port, superlink, log_dir / "superlink.log")
        for client_id in client_ids:
            node_config = f"client-id='{client_id}' data-root='{cfg.data_root}'"
            stack.enter_context(
                _process(
                    [
                        _bin("flower-supernode"),
                        "--insecure",
                        "--superlink",
                        address,
                        "--port",
                        str(free_port()),
                        "--node-config",
                        node_config,
                    ],
                    log_dir / f"supernode-{client_id}.log",
                    env,
                )
            )
        run_config = f"data-root='{cfg.data_root}' config-file='{config_file}'"
        submitted = subprocess.run(
            [_bin("flwr"), "run", str(app_dir), "pfi-local", "--run-config", run_config, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        run_id = _run_id(submitted)
        status = _wait_for_run(run_id, env, timeout_s)
    status["logs"] = str(log_dir)
    if status.get("status") != "finished:completed":
        raise DeploymentFailed(
            f"run {run_id} ended {status.get('status')}: {status.get('status-details')}; logs in {log_dir}"
        )
    return status


def _run_id(submitted: subprocess.CompletedProcess) -> int:
    try:
        reply = json.loads(submitted.stdout[submitted.stdout.index("{") :])
        return int(reply["run-id"])
    except (ValueError, KeyError):
        raise DeploymentFailed(
            f"flwr run did not start a run: {submitted.stdout}{submitted.stderr}"
        ) from None


def _wait_for_run(run_id: int, env: dict[str, str], timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        listed = subprocess.run(
            [_bin("flwr"), "ls", "pfi-local", "--run-id", str(run_id), "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        try:
            runs = json.loads(listed.stdout[listed.stdout.index("{") :]).get("runs", [])
        except ValueError:
            runs = []
        if runs and str(runs[0].get("status", "")).startswith("finished"):
            return runs[0]
        time.sleep(2.0)
    raise DeploymentFailed(f"run {run_id} did not finish within {timeout_s:.0f} s")
