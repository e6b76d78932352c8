"""The service as an operator and an attacker see it: no request stalls the others, stored text
stays private on disk, one server per data root, limits on every field that reaches a scan.

One real uvicorn server (tiny generator, real embedder, FAISS, SQLite) for the module.
"""

from __future__ import annotations

import stat
import threading
import time
from pathlib import Path

import httpx
import pytest

from pfi_rag.api import create_app
from pfi_rag.api.auth import KeyStore, KeyStoreError
from pfi_rag.api.server import ServerThread
from pfi_rag.api.textindex import TextIndex, pii_in
from pfi_rag.config import Config, ServingConfig

BOB_DOC = {"id": "boat", "text": "The red boathouse key lies under the third loose stone by the door."}


@pytest.fixture(scope="module")
def api(tmp_path_factory, live_service):
    root = tmp_path_factory.mktemp("service") / "data"
    root.mkdir(mode=0o755)
    with live_service(
        root,
        clients=("alice", "bob"),
        serving=ServingConfig(max_new_tokens=8, max_prompt_tokens=512, requests_per_minute=100_000),
        app_options={"body_timeout_s": 1.0},
    ) as live:
        assert live.call(
            "POST", "/v1/clients/bob/documents", "bob", json={"documents": [BOB_DOC]}
        ).is_success
        yield live


def test_a_huge_token_upload_does_not_stall_health_or_other_clients(api):
    """1M characters without a space: the PII scan was quadratic (63 s for 120k), blocking all."""
    token = "x" * 999_000 + "@" + "y" * 999  # a would-be e-mail: the worst case of the old pattern
    upload: dict[str, float | int] = {}

    def store_it() -> None:
        upload["start"] = time.monotonic()
        response = api.call(
            "POST", "/v1/clients/alice/documents", json={"documents": [{"id": "blob", "text": token}]}
        )
        upload["status"], upload["end"] = response.status_code, time.monotonic()

    writer = threading.Thread(target=store_it)
    writer.start()
    answered: list[tuple[str, float, float, int]] = []  # (what, sent, answered, status) while in flight
    while writer.is_alive():
        for what, call in (
            ("health", lambda: api.call("GET", "/healthz", None)),
            (
                "search",
                lambda: api.call("POST", "/v1/clients/bob/search", "bob", json={"query": "boathouse key"}),
            ),
            ("own search", lambda: api.call("POST", "/v1/clients/alice/search", json={"query": "anything"})),
        ):
            sent = time.monotonic()
            status = call().status_code
            answered.append((what, sent, time.monotonic(), status))
        time.sleep(0.02)
    writer.join()

    assert upload["status"] == 201
    during = [
        (what, status)
        for what, sent, done, status in answered
        if upload["start"] < sent and done < upload["end"]
    ]
    # Answered while the upload was stored: health, another client, and the uploader's own reads
    # (its store's lock is held only to commit, not while the chunks are embedded).
    assert {("health", 200), ("search", 200), ("own search", 200)} <= set(during)
    assert all(status == 200 for _, status in during)
    doc = api.call("GET", "/v1/clients/alice/documents").json()["documents"]
    assert [(d["doc_id"], d["chars"]) for d in doc] == [("blob", len(token))]


def test_pii_scan_is_linear_and_dates_are_not_phone_numbers():
    assert pii_in("Met on 2025-11-23, again 2025/12/01 10:30.") == set()
    assert pii_in("Call +47 912 34 567 or mail Ann.B@example.org, code 482913.") == {
        ("phone", "4791234567"),
        ("email", "ann.b@example.org"),
        ("secret", "482913"),
    }
    # What keeps the scan linear: an address may start only where a run of address characters
    # starts, and its local part is bounded (64, RFC 5321), so a long run is tried once, not once
    # per character. Its speed is measured in bench/serve.py (1M characters without a space).
    assert pii_in("a" * 64 + "@example.com") == {("email", "a" * 64 + "@example.com")}
    assert pii_in("a" * 65 + "@example.com") == set()
    assert pii_in("x" * 400_000 + "@" + "y" * 999) == set()


def test_copy_index_updates_only_the_changed_documents():
    index = TextIndex(ngram=3)
    index.apply("a", [("d1", index.scan("one two three four")), ("d2", index.scan("two three four five"))])
    index.apply("b", [("x", index.scan("nothing in common here"))])
    assert index.copied_spans("b", "two three four", "") == 1  # held by both d1 and d2

    index.apply("a", [("d1", None)])
    assert index.copied_spans("b", "two three four", "") == 1  # d2 still holds it
    assert index.copied_spans("b", "one two three", "") == 0
    index.apply("a", [("d2", index.scan("mail me at z@example.com"))])  # a new version replaces the old
    assert index.copied_spans("b", "two three four", "") == 0
    assert index.pii_origin("b", ("email", "z@example.com")) == "other-client"
    # Two versions of one document in one call (a batch): only the last stays.
    index.apply("a", [("d3", index.scan("first version text here")), ("d3", index.scan("second one words"))])
    assert index.copied_spans("b", "first version text", "") == 0
    assert index.copied_spans("b", "second one words", "") == 1


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_store_files_are_owner_only_and_deleted_text_is_gone_from_every_file(api):
    marker = "quokka-zebra-marmalade-7731"
    doc = {"id": "secret-note", "text": f"My private note: {marker} is the passphrase."}
    assert api.call("POST", "/v1/clients/alice/documents", json={"documents": [doc]}).status_code == 201
    index_dir = api.root / "clients" / "alice" / "index"
    files = sorted(index_dir.glob("docstore.sqlite*"))
    assert {f.name for f in files} >= {"docstore.sqlite", "docstore.sqlite-wal", "docstore.sqlite-shm"}

    assert mode(api.root) == 0o700 and mode(index_dir) == 0o700 and mode(index_dir.parent) == 0o700
    assert all(mode(p) == 0o600 for p in index_dir.iterdir() if p.is_file())
    assert any(marker.encode() in p.read_bytes() for p in files)  # stored: the check below can fail

    assert api.call("DELETE", "/v1/clients/alice/documents/secret-note").status_code == 200

    leftovers = [p for p in api.root.rglob("*") if p.is_file() and marker.encode() in p.read_bytes()]
    assert leftovers == []


def test_a_second_server_on_the_same_data_root_refuses_to_start(api, tiny_models_config, embedder):
    cfg = Config(data_root=api.root, models=tiny_models_config)
    with pytest.raises(RuntimeError, match="already serving"):
        ServerThread(create_app(cfg, embedder=embedder)).start()


def test_admin_is_not_a_client_name(api):
    store = KeyStore(api.root / "keys.json")
    with pytest.raises(KeyStoreError, match="reserved"):
        store.create("admin")
    admin_key = store.create(None, admin=True)[0]
    refused = httpx.post(
        f"{api.url}/v1/keys", json={"client_id": "admin"}, headers={"Authorization": f"Bearer {admin_key}"}
    )
    assert refused.status_code == 400 and "reserved" in refused.json()["error"]["message"]


def test_document_sources_show_no_server_paths(api, tmp_path):
    from pfi_rag.api.routes.documents import public_source

    assert public_source("/srv/secret/home/notes.txt") == "file:notes.txt"
    assert public_source("upload:trip.txt") == "upload:trip.txt" and public_source("api") == "api"


def test_a_half_sent_body_is_answered_408_and_the_connection_closed(api):
    import socket

    host, port = api.url.removeprefix("http://").split(":")
    head = (
        "POST /v1/clients/alice/search HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Authorization: Bearer {api.keys['alice']}\r\nContent-Length: 100\r\n\r\n"
    )
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head.encode() + b'{"query": "hal')  # ... and never the rest
        answer = b""
        while chunk := sock.recv(4096):  # returns b"" once the server closes the connection
            answer += chunk

    assert answer.startswith(b"HTTP/1.1 408") and b"request_timeout" in answer
