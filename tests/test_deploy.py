"""A deployment beyond one machine: TLS certificates, SuperNode keys, and real Flower processes.

The SuperLink and SuperNodes run as real processes on loopback with TLS and SuperNode
authentication on, exactly as they would across hosts (docs/deployment.md).
"""

from __future__ import annotations

import json
import stat
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from pfi_rag.config import load_config
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.certificates import write_deployment_keys
from pfi_rag.federation.deploy import register_node, run_deployment, supernode_command, write_operator_kit
from pfi_rag.federation.processes import (
    CONNECTION,
    flower_bin,
    flower_env,
    free_port,
    managed_process,
    superlink_command,
    wait_for_port,
    write_run_files,
)
from pfi_rag.federation.records import read_round_records


def test_keys_chain_to_the_ca_and_node_keys_are_what_flower_reads(tmp_path):
    keys = write_deployment_keys(tmp_path / "kit", superlink_hosts=["link.example.org"], clients=["alice"])

    ca = x509.load_pem_x509_certificate(keys.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(keys.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    node = keys.nodes["alice"]
    private = load_ssh_private_key(node.private_key.read_bytes(), None)
    public = load_ssh_public_key(node.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert public.public_numbers() == private.public_key().public_numbers()
    for secret in (tmp_path / "kit" / "ca" / "ca.key", keys.server_key, node.private_key):
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
    # The SuperLink's folder gets the public key to register, never a private one.
    assert (keys.superlink_dir() / "nodes" / "alice.pub").read_bytes() == node.public_key.read_bytes()
    assert not list(keys.superlink_dir().rglob("node.key"))


def test_operator_kit_refuses_to_replace_a_ca_and_names_the_hosts(tmp_path):
    keys = write_operator_kit(
        tmp_path / "kit", superlink_hosts=["10.0.0.5"], clients=["alice", "bob"], port=9092
    )

    with pytest.raises(FileExistsError):
        write_operator_kit(tmp_path / "kit", superlink_hosts=["10.0.0.5"], clients=["alice"], port=9092)
    node_readme = (keys.supernode_dir("bob") / "README.txt").read_text()
    assert "--superlink 10.0.0.5:9092" in node_readme and "client-id='bob'" in node_readme
    link_readme = (keys.superlink_dir() / "README.txt").read_text()
    assert "--enable-supernode-auth" in link_readme and "nodes/alice.pub" in link_readme
    assert (keys.superlink_dir() / "app" / "pyproject.toml").is_file()


def _wait_until(check, timeout_s: float, what: str):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"{what} within {timeout_s:.0f} s")


def _node_statuses(env) -> list[str]:
    listed = subprocess.run(
        [flower_bin("flwr"), "supernode", "list", CONNECTION, "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        check=False,
    )
    nodes = json.loads(listed.stdout[listed.stdout.index("{") :]).get("nodes", [])
    return sorted(node["status"] for node in nodes)


@pytest.mark.slow
def test_superlink_with_authentication_admits_registered_nodes_and_refuses_the_rest(tmp_path):
    # Prepare: a TLS SuperLink with SuperNode authentication; one registered key, one not.
    keys = write_deployment_keys(
        tmp_path / "tls", superlink_hosts=["127.0.0.1"], clients=["alice", "mallory"]
    )
    port = free_port()
    address = f"127.0.0.1:{port}"
    _, _, flwr_home = write_run_files(
        load_config(overrides={"data_root": str(tmp_path)}), tmp_path, address, keys.ca_cert
    )
    env = flower_env(flwr_home)
    logs = tmp_path / "logs"

    def node(name: str, private_key):
        command = supernode_command(
            address, free_port(), f"client-id='{name}'", ca_cert=keys.ca_cert, private_key=private_key
        )
        return managed_process(command, logs / f"{name}.log", env)

    with ExitStack() as stack:
        superlink = stack.enter_context(
            managed_process(
                superlink_command(port, tmp_path / "superlink.db", keys), logs / "superlink.log", env
            )
        )
        wait_for_port(port, superlink, logs / "superlink.log")
        register_node(keys.nodes["alice"].public_key, env)

        # Execute: alice with her registered key, mallory with an unregistered key, and a node
        # with no key at all.
        alice = stack.enter_context(node("alice", keys.nodes["alice"].private_key))
        mallory = stack.enter_context(node("mallory", keys.nodes["mallory"].private_key))
        anonymous = stack.enter_context(node("anonymous", None))

        # Assert: the two others are refused and exit; alice is online and stays up.
        _wait_until(
            lambda: mallory.poll() is not None and anonymous.poll() is not None, 90, "refused nodes exit"
        )
        _wait_until(lambda: _node_statuses(env) == ["online"], 90, "alice online")
        assert alice.poll() is None
    assert mallory.returncode != 0 and anonymous.returncode != 0
    assert "Failed to activate SuperNode" in (logs / "mallory.log").read_text()
    assert "must be registered" in (logs / "anonymous.log").read_text()


@pytest.mark.slow
def test_tls_deployment_runs_the_federation_with_authenticated_supernodes(tmp_path, model_cache):
    synthesize(tmp_path, clients=2, seed=0)
    cfg = load_config(
        overrides={
            "data_root": str(tmp_path),
            "models.generator": "tiny-random",
            "models.device": "cpu",
            "models.cache_dir": str(model_cache),
            "federation.rounds": 1,
            "privacy.local_steps": 2,
            "privacy.batch_size": 4,
            "privacy.max_seq_len": 48,
            "privacy.epsilon_per_round": 4.0,
            "privacy.epsilon_max": 100.0,
        }
    )

    status = run_deployment(cfg, clients=2, timeout_s=600, tls=True)

    assert status["status"] == "finished:completed" and status["tls"] is True
    (record,) = read_round_records(tmp_path)
    assert sorted(record.results) == ["client-00", "client-01"]
    logs = Path(status["logs"])
    assert {p.name for p in logs.glob("supernode-*.log")} == {
        "supernode-client-00.log",
        "supernode-client-01.log",
    }
    link_log = (logs / "superlink.log").read_text()
    assert "https://127.0.0.1" in link_log  # the SuperLink served TLS, not plaintext
    flwr_config = (tmp_path / "federation" / "deploy" / "flwr-home" / "config.toml").read_text()
    assert "root-certificates" in flwr_config and "insecure" not in flwr_config


def test_deploy_keys_command_writes_the_kit_and_refuses_bad_input_with_exit_2(tmp_path):
    from typer.testing import CliRunner

    from pfi_rag.cli import app

    args = ["deploy", "keys", "--out", str(tmp_path / "kit"), "--superlink-host", "10.0.0.5"]

    made = CliRunner().invoke(app, [*args, "--clients", "alice,bob"])
    again = CliRunner().invoke(app, [*args, "--clients", "alice"])
    bad_id = CliRunner().invoke(
        app, ["deploy", "keys", "--out", str(tmp_path / "k2"), "--superlink-host", "h", "--clients", "../etc"]
    )

    assert made.exit_code == 0, made.output
    assert (tmp_path / "kit" / "supernode-bob" / "node.key").is_file()
    assert again.exit_code == 2 and "already holds a certificate authority" in again.output
    assert bad_id.exit_code == 2 and "invalid client id" in bad_id.output
    assert not (tmp_path / "k2" / "ca").exists()  # refused before anything was written
