"""`pfi-rag deploy local`: the federation on Flower's Deployment Engine, as real processes.

One ``flower-superlink`` and one ``flower-supernode`` per client on loopback; the run is
submitted with ``flwr run`` against a Flower config written to a private ``FLWR_HOME``, so
the user's own ``~/.flwr`` is never touched. Each SuperNode is told its client id and data
root through its node config and reads nothing else.

With ``tls=True`` the same processes run as they would across machines (docs/deployment.md):
the SuperLink serves TLS with a certificate from a fresh CA and admits only SuperNodes whose
public keys were registered (``--enable-supernode-auth`` + ``flwr supernode register``); each
SuperNode checks the SuperLink against the CA and signs in with its own private key.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import tomli_w

from pfi_rag import layout
from pfi_rag.config import Config
from pfi_rag.federation.certificates import DeploymentKeys, write_deployment_keys
from pfi_rag.storage import atomic_write_text

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


CONNECTION = "pfi-local"  # the SuperLink connection's name in the private Flower config


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
    # These processes write to log files: keep Flower's INFO there even when the CLI quiets the screen.
    env["FLWR_LOG_LEVEL"] = "INFO"
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


def write_run_files(
    cfg: Config, base: Path, address: str, ca_cert: Path | None = None
) -> tuple[Path, Path, Path]:
    """The Flower app directory, the effective pfi-rag config, and a private Flower config.

    ``ca_cert``: the SuperLink serves TLS and ``flwr`` checks it against this CA certificate.
    """
    app_dir = base / "app"
    atomic_write_text(app_dir / "pyproject.toml", APP_PYPROJECT)
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
    port: int, database: Path, keys: DeploymentKeys | None, host: str = "127.0.0.1"
) -> list[str]:
    """``flower-superlink`` on ``host:port`` (one HTTP port serves the Fleet, Control and Runtime APIs)."""
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
    return [
        _bin("flower-superlink"),
        *security,
        "--host",
        host,
        "--port",
        str(port),
        "--disable-runtime-dependency-installation",
        "--database",
        str(database),
    ]


def supernode_command(
    superlink: str, port: int, node_config: str, *, ca_cert: Path | None, private_key: Path | None
) -> list[str]:
    """``flower-supernode`` for one client; TLS when ``ca_cert`` is given, signed in with ``private_key``."""
    security = ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        security += ["--auth-supernode-private-key", str(private_key)]
    return [
        _bin("flower-supernode"),
        *security,
        "--superlink",
        superlink,
        "--port",
        str(port),
        "--node-config",
        node_config,
    ]


def register_node(public_key: Path, env: dict[str, str]) -> str:
    """Register a SuperNode's public key with the SuperLink (``flwr supernode register``); its id."""
    done = subprocess.run(
        [_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    try:
        reply = json.loads(done.stdout[done.stdout.index("{") :])
        return str(reply["node-id"])
    except (ValueError, KeyError):
        raise DeploymentFailed(
            f"registering {public_key.name} failed: {done.stdout}{done.stderr}".strip()
        ) from None


def run_deployment(cfg: Config, clients: int, timeout_s: float = 3600.0, *, tls: bool = False) -> dict:
    """Start SuperLink + one SuperNode per client, run the federation, stop them; the run's status.

    ``tls``: TLS on every connection and SuperNode authentication, with a fresh CA and node keys
    under ``federation/deploy/tls/`` (the files ``pfi-rag deploy keys`` makes for real hosts).
    """
    from pfi_rag.federation.launcher import plan_participants

    uncapped = cfg.model_copy(deep=True)
    uncapped.federation.clients = None  # --clients is the cap here
    ready, left_out = plan_participants(uncapped)  # clients with documents to train on, by id
    client_ids = ready[:clients]
    if len(client_ids) < clients:
        why = "".join(f"; {client}: {reason}" for client, reason in left_out.items())
        raise ValueError(
            f"{cfg.data_root} holds {len(client_ids)} clients with documents to train on, fewer than "
            f"{clients}{why}"
        )
    cfg = cfg.model_copy(deep=True)
    cfg.data_root = Path(cfg.data_root).resolve()
    cfg.federation.clients = clients
    base = layout.deploy_dir(cfg.data_root)
    log_dir = base / "logs"
    keys = None
    if tls:
        shutil.rmtree(base / "tls", ignore_errors=True)  # a fresh CA per local run
        keys = write_deployment_keys(base / "tls", superlink_hosts=["127.0.0.1"], clients=client_ids)
    port = free_port()
    address = f"127.0.0.1:{port}"
    app_dir, config_file, flwr_home = write_run_files(cfg, base, address, keys.ca_cert if keys else None)
    env = _env(flwr_home)
    with ExitStack() as stack:
        superlink = stack.enter_context(
            _process(superlink_command(port, base / "superlink.db", keys), log_dir / "superlink.log", env)
        )
        _wait_for_port(port, superlink, log_dir / "superlink.log")
        for client_id in client_ids:
            if keys is not None:
                register_node(keys.nodes[client_id].public_key, env)
            node_config = f"client-id='{client_id}' data-root='{cfg.data_root}'"
            command = supernode_command(
                address,
                free_port(),
                node_config,
                ca_cert=keys.supernode_dir(client_id) / "ca.crt" if keys else None,
                private_key=keys.nodes[client_id].private_key if keys else None,
            )
            stack.enter_context(_process(command, log_dir / f"supernode-{client_id}.log", env))
        run_config = f"data-root='{cfg.data_root}' config-file='{config_file}'"
        submitted = subprocess.run(
            [_bin("flwr"), "run", str(app_dir), CONNECTION, "--run-config", run_config, "--format", "json"],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        run_id = _run_id(submitted)
        status = _wait_for_run(run_id, env, timeout_s)
    status["logs"] = str(log_dir)
    status["tls"] = tls
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
            [_bin("flwr"), "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"],
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


SUPERLINK_README = """\
SuperLink host: run the federation's server side here.

1. Install pfi-rag (the same version as on every client host): git clone ...; make setup
2. Start the SuperLink in this folder (one HTTPS port serves SuperNodes, flwr and the ServerApp):

   flower-superlink --ssl-ca-certfile ca.crt --ssl-certfile server.crt --ssl-keyfile server.key \\
     --enable-supernode-auth --disable-runtime-dependency-installation \\
     --host 0.0.0.0 --port {port} --database superlink.db

3. Point flwr at it (~/.flwr/config.toml or $FLWR_HOME/config.toml):

   [superlink]
   default = "pfi"

   [superlink.pfi]
   address = "{address}"
   root-certificates = "<this folder>/ca.crt"

4. Register every SuperNode's public key (only registered nodes may join):

{register}
   flwr supernode list pfi

5. Once the SuperNodes are up, submit the run from this folder (app/ describes the Flower app;
   the ServerApp and ClientApp come from the installed pfi_rag package; paths are on this host):

   export FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
   flwr run app pfi --stream \\
     --run-config "data-root='/srv/pfi-data' config-file='/srv/pfi-rag.toml'"
"""

SUPERNODE_README = """\
SuperNode host of client {client}: copy this folder to the machine that holds {client}'s data.
node.key is this client's secret: it must not leave this host (mode 600).

1. Install pfi-rag (the same version as on the SuperLink host): git clone ...; make setup
2. Start the SuperNode in this folder, with the client's data root (clients/{client}/ under it):

   flower-supernode --superlink {address} --root-certificates ca.crt \\
     --auth-supernode-private-key node.key \\
     --node-config "client-id='{client}' data-root='/srv/pfi-data'"

The SuperLink refuses this node until its operator has registered node.pub
(flwr supernode register).
"""


def write_operator_kit(
    out: Path, *, superlink_hosts: list[str], clients: list[str], port: int
) -> DeploymentKeys:
    """Certificates, node keys and per-host instructions for a deployment across machines.

    One folder per host under ``out`` (``superlink/``, ``supernode-<client>/``), each with a
    README.txt holding the exact commands for that host; ``ca/`` stays with the operator.
    """
    if not superlink_hosts:
        raise ValueError("give the name or address the SuperNodes reach the SuperLink at (--superlink-host)")
    keys = write_deployment_keys(out, superlink_hosts=superlink_hosts, clients=clients)
    address = f"{superlink_hosts[0]}:{port}"
    register = "\n".join(f"   flwr supernode register nodes/{client}.pub pfi" for client in clients)
    atomic_write_text(keys.superlink_dir() / "app" / "pyproject.toml", APP_PYPROJECT)
    atomic_write_text(
        keys.superlink_dir() / "README.txt",
        SUPERLINK_README.format(port=port, address=address, register=register),
    )
    for client in clients:
        atomic_write_text(
            keys.supernode_dir(client) / "README.txt",
            SUPERNODE_README.format(client=client, address=address),
        )
    return keys
