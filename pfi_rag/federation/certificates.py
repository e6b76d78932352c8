"""Certificates and node keys for a Flower deployment with TLS and SuperNode authentication.

Flower 1.42 wants, for TLS: a CA certificate, and a SuperLink certificate signed by it whose
subject alternative names cover every address the SuperLink is reached at (the SuperLink's own
ServerApp process connects to it on 127.0.0.1, so that is always included). For SuperNode
authentication: one elliptic-curve key pair per SuperNode on a NIST curve, the private key in
OpenSSH format (``flower-supernode --auth-supernode-private-key``) and the public key as an
OpenSSH line (``flwr supernode register``). Everything is made with ``cryptography`` (a
dependency of Flower), so no ``openssl`` binary is needed.

Layout written by :func:`write_deployment_keys` (one folder per host, to copy as a whole)::

    ca/ca.crt, ca/ca.key                 the certificate authority; ca.key never leaves this machine
    superlink/ca.crt, server.crt, server.key, nodes/<client>.pub
    supernode-<client>/ca.crt, node.key, node.pub
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from pfi_rag.layout import validate_client_id

CURVE = ec.SECP384R1  # P-384: what `flwr supernode register` documents; TLS accepts it too
LOCAL_NAMES = ("localhost", "127.0.0.1")


@dataclass(frozen=True)
class NodeKeys:
    client_id: str
    private_key: Path  # OpenSSH private key: flower-supernode --auth-supernode-private-key
    public_key: Path  # OpenSSH public key line: flwr supernode register


@dataclass(frozen=True)
class DeploymentKeys:
    root: Path
    ca_cert: Path
    server_cert: Path
    server_key: Path
    nodes: dict[str, NodeKeys]

    def superlink_dir(self) -> Path:
        return self.root / "superlink"

    def supernode_dir(self, client_id: str) -> Path:
        return self.root / f"supernode-{client_id}"


def write_deployment_keys(
    out: Path, *, superlink_hosts: list[str], clients: list[str], days: int = 365
) -> DeploymentKeys:
    """A CA, a SuperLink certificate for ``superlink_hosts`` and a key pair per client, under ``out``.

    Refuses to overwrite an existing set (a second CA would silently invalidate the first's
    certificates on hosts that already have them).
    """
    for client in clients:
        validate_client_id(client)
    if not clients:
        raise ValueError("give at least one client to make a SuperNode key for")
    out = Path(out)
    if (out / "ca" / "ca.key").exists():
        raise FileExistsError(f"{out} already holds a certificate authority; choose another --out")
    names = list(dict.fromkeys([*superlink_hosts, *LOCAL_NAMES]))
    now = dt.datetime.now(dt.UTC)

    ca_key = ec.generate_private_key(CURVE())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "pfi-rag federation CA")])
    ca_cert = (
        _builder(ca_name, ca_name, ca_key.public_key(), now, days)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(cert_sign=True), critical=True)
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(CURVE())
    server_cert = (
        _builder(
            x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]),
            ca_name,
            server_key.public_key(),
            now,
            days,
        )
        .add_extension(x509.SubjectAlternativeName([_general_name(n) for n in names]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(cert_sign=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )

    ca_pem = ca_cert.public_bytes(serialization.Encoding.PEM)
    _write(out / "ca" / "ca.crt", ca_pem)
    _write(out / "ca" / "ca.key", _pem_private(ca_key), secret=True)
    link = out / "superlink"
    _write(link / "ca.crt", ca_pem)
    _write(link / "server.crt", server_cert.public_bytes(serialization.Encoding.PEM))
    _write(link / "server.key", _pem_private(server_key), secret=True)

    nodes = {}
    for client in clients:
        key = ec.generate_private_key(CURVE())
        public = key.public_key().public_bytes(
            serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
        )
        public += f" pfi-rag-{client}\n".encode()
        node_dir = out / f"supernode-{client}"
        _write(node_dir / "ca.crt", ca_pem)
        _write(
            node_dir / "node.key",
            key.private_bytes(
                serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
            ),
            secret=True,
        )
        _write(node_dir / "node.pub", public)
        _write(link / "nodes" / f"{client}.pub", public)
        nodes[client] = NodeKeys(client, node_dir / "node.key", node_dir / "node.pub")
    return DeploymentKeys(
        root=out,
        ca_cert=link / "ca.crt",
        server_cert=link / "server.crt",
        server_key=link / "server.key",
        nodes=nodes,
    )


def _builder(subject, issuer, public_key, now: dt.datetime, days: int) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))  # tolerate small clock skew between hosts
        .not_valid_after(now + dt.timedelta(days=days))
    )


def _key_usage(*, cert_sign: bool) -> x509.KeyUsage:
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=not cert_sign,
        key_cert_sign=cert_sign,
        crl_sign=cert_sign,
        encipher_only=False,
        decipher_only=False,
    )


def _general_name(name: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        return x509.DNSName(name)


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _write(path: Path, data: bytes, *, secret: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as handle:
        handle.write(data)
