"""`pfi-rag clients` (keys stored only as hashes) and `pfi-rag serve`, plus the request limits
(body size, requests per key) on a real server with tight limits."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from pfi_rag.api.auth import KeyStore
from pfi_rag.cli import app as cli
from pfi_rag.config import ServingConfig

runner = CliRunner()


def run_cli(root, *args: str):
    return runner.invoke(cli, ["--data-root", str(root), *args])


def test_clients_create_prints_a_key_once_and_stores_only_its_hash(isolated_env):
    root = isolated_env / "data"

    created = run_cli(root, "clients", "create", "client-00", "--json")
    again = run_cli(root, "clients", "create", "client-00")
    admin = run_cli(root, "clients", "create", "--admin", "--json")
    bad = run_cli(root, "clients", "create", "../escape")
    listed = run_cli(root, "clients", "list", "--json")

    assert created.exit_code == 0, created.output
    key = json.loads(created.stdout)["key"]
    stored = (root / "keys.json").read_text()
    assert key not in stored and key.split("_")[2] not in stored
    assert oct((root / "keys.json").stat().st_mode)[-3:] == "600"
    assert KeyStore(root / "keys.json").authenticate(key).client_id == "client-00"
    assert KeyStore(root / "keys.json").authenticate(key[:-1] + ("A" if key[-1] != "A" else "B")) is None
    assert again.exit_code == 2 and "rotate" in again.output
    assert json.loads(admin.stdout)["admin"] is True
    assert bad.exit_code == 2 and "invalid client id" in bad.output
    assert {k["client_id"] for k in json.loads(listed.stdout)} == {"client-00", None}
    assert "key" not in json.loads(listed.stdout)[0]


def test_clients_rotate_and_revoke(isolated_env):
    root = isolated_env / "data"
    old = json.loads(run_cli(root, "clients", "create", "client-01", "--json").stdout)["key"]

    new = json.loads(run_cli(root, "clients", "rotate", "client-01", "--json").stdout)["key"]
    keys = KeyStore(root / "keys.json")
    assert keys.authenticate(old) is None and keys.authenticate(new).client_id == "client-01"

    assert run_cli(root, "clients", "revoke", "client-01").exit_code == 0
    assert keys.authenticate(new) is None
    assert run_cli(root, "clients", "revoke", "client-01").exit_code == 2


@pytest.fixture(scope="module")
def tight(tmp_path_factory, live_service):
    serving = ServingConfig(max_body_bytes=1024, requests_per_minute=3, max_new_tokens=4)
    with live_service(tmp_path_factory.mktemp("limits"), clients=("alice", "bob"), serving=serving) as live:
        yield live.url, live.keys


def test_oversized_bodies_get_413_with_or_without_a_length(tight):
    url, keys = tight
    headers = {"Authorization": f"Bearer {keys['bob']}", "content-type": "application/json"}
    body = json.dumps({"documents": [{"text": "x" * 2000}]}).encode()

    sized = httpx.post(f"{url}/v1/clients/bob/documents", content=body, headers=headers)
    chunked = httpx.post(
        f"{url}/v1/clients/bob/documents", content=iter([body[:600], body[600:]]), headers=headers
    )

    assert sized.status_code == chunked.status_code == 413
    assert "serving.max_body_bytes" in sized.json()["error"]["message"]
    assert (
        "transfer-encoding" not in sized.request.headers
        and chunked.request.headers["transfer-encoding"] == "chunked"
    )


def test_requests_past_the_rate_get_429_per_key(tight):
    url, keys = tight

    statuses = [
        httpx.get(f"{url}/v1/clients/alice/documents", headers={"Authorization": f"Bearer {keys['alice']}"})
        for _ in range(5)
    ]
    other = httpx.get(f"{url}/v1/clients/bob/privacy", headers={"Authorization": f"Bearer {keys['bob']}"})

    assert [r.status_code for r in statuses[:3]] == [200, 200, 200]  # a full bucket of 3
    assert statuses[4].status_code == 429 and int(statuses[4].headers["retry-after"]) >= 1
    assert statuses[4].json()["error"]["type"] == "rate_limited"
    assert other.status_code == 200  # another key has its own bucket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_pfi_rag_serve_starts_the_service_and_stops_cleanly(isolated_env, model_cache):
    root = isolated_env / "data"
    key = json.loads(run_cli(root, "clients", "create", "client-00", "--json").stdout)["key"]
    port = free_port()
    env = {
        **os.environ,
        "PFI_RAG_MODELS__GENERATOR": "tiny-random",
        "PFI_RAG_MODELS__CACHE_DIR": str(model_cache),
    }
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "pfi_rag",
            "--data-root",
            str(root),
            "serve",
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        env={**env, "PFI_RAG_MODELS__THREADS": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        ready = None
        deadline = time.monotonic() + 600
        while server.poll() is None and ready is None and time.monotonic() < deadline:  # models load first
            try:
                ready = httpx.get(f"http://127.0.0.1:{port}/readyz")
            except httpx.TransportError:
                time.sleep(0.2)
        assert ready is not None and ready.json()["generator"] == "tiny-random", server.stdout.read()
        ingest = httpx.post(
            f"http://127.0.0.1:{port}/v1/clients/client-00/documents",
            json={"documents": [{"id": "n", "text": "Served by the CLI."}]},
            headers={"Authorization": f"Bearer {key}"},
        )
        assert ingest.status_code == 201
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=60)
    assert server.returncode == 0, output
    assert f"serving on http://127.0.0.1:{port}" in output


def test_a_second_serve_on_the_same_data_root_refuses_with_a_clear_line(isolated_env):
    from pfi_rag.api.services import hold_data_root

    root = isolated_env / "data"
    held = hold_data_root(root)  # what a running server holds
    try:
        result = run_cli(root, "serve", "--port", "1")
    finally:
        os.close(held)

    assert result.exit_code == 2 and "already serving" in result.output
