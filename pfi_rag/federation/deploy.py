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
import shutil
import subprocess
from contextlib import ExitStack
from pathlib import Path

from pfi_rag import layout
from pfi_rag.config import Config
from pfi_rag.federation.certificates import DeploymentKeys, write_deployment_keys
from pfi_rag.federation.processes import (
    CONNECTION,
    FlowerProcessFailed,
    app_pyproject,
    flower_bin,
    flower_env,
    free_port,
    managed_process,
    run_config_file,
    submit_run,
    superlink_command,
    wait_for_port,
    wait_for_run,
    write_run_files,
)
from pfi_rag.storage import atomic_write_text

# A process did not start, or the run did not finish successfully.
DeploymentFailed = FlowerProcessFailed


def supernode_command(
    superlink: str, port: int, node_config: str, *, ca_cert: Path | None, private_key: Path | None
) -> list[str]:
    """``flower-supernode`` for one client; TLS when ``ca_cert`` is given, signed in with ``private_key``."""
    security = ["--insecure"] if ca_cert is None else ["--root-certificates", str(ca_cert)]
    if private_key is not None:
        security += ["--auth-supernode-private-key", str(private_key)]
    return [
        flower_bin("flower-supernode"),
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
        [flower_bin("flwr"), "supernode", "register", str(public_key), CONNECTION, "--format", "json"],
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
    env = flower_env(flwr_home)
    with ExitStack() as stack:
        superlink = stack.enter_context(
            managed_process(
                superlink_command(port, base / "superlink.db", keys), log_dir / "superlink.log", env
            )
        )
        wait_for_port(port, superlink, log_dir / "superlink.log")
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
            stack.enter_context(managed_process(command, log_dir / f"supernode-{client_id}.log", env))
        run_config = run_config_file(
            base / "run-config.toml", {"data-root": str(cfg.data_root), "config-file": str(config_file)}
        )
        run_id = submit_run(app_dir, run_config, env)
        status = wait_for_run(run_id, env, timeout_s)
    status["logs"] = str(log_dir)
    status["tls"] = tls
    if status.get("status") != "finished:completed":
        raise DeploymentFailed(
            f"run {run_id} ended {status.get('status')}: {status.get('status-details')}; logs in {log_dir}"
        )
    return status


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
    atomic_write_text(keys.superlink_dir() / "app" / "pyproject.toml", app_pyproject())
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
