"""The HTTP API on a real uvicorn server (loopback), with the tiny model, the real embedder and FAISS.

One server per module: ingest, search, generate with citations and probes, streams, delete, the
privacy ledger, the official ``openai`` client, batching, metrics; serve-time probes on real
stores; and every route tried with another client's key.
"""

from __future__ import annotations

import json
import threading

import httpx
import openai
import pytest

from pfi_rag.config import ProbesConfig, ServingConfig
from pfi_rag.data.corpus import load_corpus
from pfi_rag.models import GenerationResult, ServedAdapter, UsedPassage
from pfi_rag.models.adapters import client_adapter_dir
from tests.generation_support import save_random_adapter

ALICE_DOCS = [
    {
        "id": "home",
        "text": "I moved to Bergen in March. My flat is near the fish market.",
        "metadata": {"kind": "note"},
    },
    {
        "id": "dog",
        "text": "My dog is called Biscuit and loves long walks on the beach.",
        "metadata": {"kind": "note"},
    },
    {
        "id": "contact",
        "text": "Reach me at alice@example.com; my locker code is 482913.",
        "metadata": {"kind": "email"},
    },
]
BOB_SECRET = "Bob keeps the spare key for the red boathouse under the third loose stone by the door"


@pytest.fixture(scope="module")
def api(tmp_path_factory, tiny_generator, live_service):
    root = tmp_path_factory.mktemp("api")
    save_random_adapter(tiny_generator[0], client_adapter_dir(root, "bob"), seed=1)
    with live_service(
        root,
        clients=("alice", "bob", "carol"),
        admin=True,
        serving=ServingConfig(max_new_tokens=16, max_prompt_tokens=512, requests_per_minute=100_000),
        probes=ProbesConfig(serve_divergence=True),
    ) as live:
        assert (
            live.call("POST", "/v1/clients/alice/documents", json={"documents": ALICE_DOCS}).status_code
            == 201
        )
        bob_doc = {"documents": [{"id": "boathouse", "text": BOB_SECRET + ". Call +47 912 34 567."}]}
        assert live.call("POST", "/v1/clients/bob/documents", "bob", json=bob_doc).status_code == 201
        yield live


def test_health_and_readiness(api):
    assert api.call("GET", "/healthz", None).json() == {"status": "ok"}
    ready = api.call("GET", "/readyz", None).json()
    assert ready["ready"] and ready["generator"] == "tiny-random"


def test_ingest_list_get_search_delete(api):
    listed = api.call("GET", "/v1/clients/alice/documents").json()["documents"]
    assert {d["doc_id"] for d in listed} == {"home", "dog", "contact"}

    again = api.call("POST", "/v1/clients/alice/documents", json={"documents": ALICE_DOCS[:1]}).json()
    assert again["unchanged"] == 1 and again["added"] == 0

    upload = api.call(
        "POST",
        "/v1/clients/alice/documents",
        files={"file": ("trip.txt", b"We are planning a trip to Tromso to see the northern lights.")},
    )
    assert upload.status_code == 201 and upload.json()["doc_ids"] == ["trip.txt"]
    lines = "\n".join(
        json.dumps({"id": f"line-{i}", "text": f"Diary line {i} about cycling."}) for i in range(3)
    )
    jsonl = api.call("POST", "/v1/clients/alice/documents", files={"file": ("diary.jsonl", lines.encode())})
    assert jsonl.json()["added"] == 3

    doc = api.call("GET", "/v1/clients/alice/documents/trip.txt").json()
    assert doc["text"].startswith("We are planning") and doc["chunks"] and doc["source"] == "upload:trip.txt"

    hits = api.call(
        "POST", "/v1/clients/alice/search", json={"query": "northern lights trip", "k": 2}
    ).json()["hits"]
    assert hits[0]["doc_id"] == "trip.txt" and hits[0]["score"] >= hits[1]["score"]
    filtered = api.call(
        "POST", "/v1/clients/alice/search", json={"query": "dog", "where": {"kind": "email"}}
    ).json()
    assert {h["doc_id"] for h in filtered["hits"]} == {"contact"}

    # What a federated round trains on is read from this same store (federation/task.py).
    before = load_corpus(api.root, "alice")
    assert {"trip.txt", "line-0"} <= {d.id for d in before.train + before.held_out}
    for doc_id in ("trip.txt", "line-0", "line-1", "line-2"):
        assert api.call("DELETE", f"/v1/clients/alice/documents/{doc_id}").json() == {
            "doc_id": doc_id,
            "deleted": True,
        }
    assert api.call("GET", "/v1/clients/alice/documents/trip.txt").status_code == 404
    assert api.call("DELETE", "/v1/clients/alice/documents/trip.txt").status_code == 404
    corpus = load_corpus(api.root, "alice")
    after = {d.id for d in corpus.train + corpus.held_out}
    assert "home" in after and not after & {"trip.txt", "line-0", "line-1", "line-2"}
    hits = api.call("POST", "/v1/clients/alice/search", json={"query": "northern lights trip"}).json()["hits"]
    assert "trip.txt" not in {h["doc_id"] for h in hits}


def test_an_unrelated_question_gets_no_passage_and_its_citations_say_so(api):
    # Alice's nearest note to anything may be her locker code; under the relevance floor it stays out.
    body = {"client_id": "alice", "prompt": "Write a short poem about the sea.", "max_new_tokens": 4}
    answer = api.call("POST", "/v1/generate", json=body).json()

    assert answer["citations"] == [] and answer["passages_below_floor"] == 3
    assert "482913" not in answer["text"]


def test_generate_answers_with_citations_adapter_probes_and_usage(api):
    body = {"client_id": "alice", "prompt": "Where did I move to?", "max_new_tokens": 8}
    answer = api.call("POST", "/v1/generate", json=body).json()

    assert isinstance(answer["text"], str)
    assert [c["number"] for c in answer["citations"]] == list(range(1, len(answer["citations"]) + 1))
    assert {c["doc_id"] for c in answer["citations"]} <= {"home", "dog", "contact"}
    assert answer["citations"][0]["doc_id"] == "home"  # the best passage comes first
    assert answer["adapter"] == {"kind": "base", "version": None, "round": None}
    probes = answer["probes"]
    assert probes["retrieval_confidence"] == pytest.approx(answer["citations"][0]["score"])
    assert probes["divergence"] is None  # the base model served: nothing to diverge from
    assert probes["elapsed_ms"] >= 0 and isinstance(probes["flagged"], bool)
    usage = answer["usage"]
    assert 1 <= usage["completion_tokens"] <= 8 and usage["prompt_tokens"] > 20 and usage["latency_ms"] > 0

    bob = api.call(
        "POST", "/v1/generate", "bob", json={"client_id": "bob", "prompt": "Where is the key?"}
    ).json()
    assert bob["adapter"]["kind"] == "client" and bob["adapter"]["version"] == 1
    assert bob["probes"]["divergence"] > 0  # random LoRA weights move the next-token distribution


def read_events(response: httpx.Response) -> list[tuple[str, dict]]:
    events = []
    for block in response.text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines())
        events.append((fields["event"], json.loads(fields["data"])))
    return events


def test_streamed_generation_equals_the_plain_answer(api):
    body = {"client_id": "alice", "prompt": "What is my dog called?", "max_new_tokens": 12}
    plain = api.call("POST", "/v1/generate", json=body).json()

    streamed = api.call("POST", "/v1/generate", json={**body, "stream": True})

    assert streamed.headers["content-type"].startswith("text/event-stream")
    events = read_events(streamed)
    assert [name for name, _ in events[:-1]] == ["token"] * (len(events) - 1) and events[-1][0] == "result"
    assert "".join(data["text"] for _, data in events[:-1]) == plain["text"]  # greedy: same tokens
    assert events[-1][1]["text"] == plain["text"] and events[-1][1]["citations"] == plain["citations"]


def test_official_openai_client_chat_plain_and_streaming(api):
    client = openai.OpenAI(base_url=api.url + "/v1", api_key=api.keys["alice"], max_retries=0)
    messages = [{"role": "user", "content": "Where did I move to?"}]

    completion = client.chat.completions.create(
        model="pfi-rag", messages=messages, max_tokens=10, temperature=0
    )
    chunks = list(
        client.chat.completions.create(
            model="pfi-rag", messages=messages, max_tokens=10, temperature=0, stream=True
        )
    )

    text = completion.choices[0].message.content
    assert completion.choices[0].message.role == "assistant" and completion.model == "pfi-rag"
    assert completion.choices[0].finish_reason in {"stop", "length"}
    assert completion.usage.completion_tokens <= 10
    assert completion.model_extra["pfi_rag"]["citations"][0]["doc_id"] == "home"
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text
    assert chunks[-1].choices[0].finish_reason == completion.choices[0].finish_reason

    with pytest.raises(openai.BadRequestError):  # the last turn must be the user's
        client.chat.completions.create(model="pfi-rag", messages=[{"role": "assistant", "content": "hi"}])
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=api.url + "/v1", api_key="pfi_nope_nope", max_retries=0
        ).chat.completions.create(model="pfi-rag", messages=messages)


def test_privacy_ledger_shows_what_training_spent(api):
    from opacus.accountants import RDPAccountant

    from pfi_rag.privacy.ledger import PrivacyLedger

    empty = api.call("GET", "/v1/clients/carol/privacy", "carol").json()
    assert empty["epsilon_spent"] == 0 and empty["spends"] == [] and empty["epsilon_max"] == 8.0
    cfg = api.services.cfg.privacy
    ledger = PrivacyLedger.open(api.root, "carol", cfg)
    accountant = RDPAccountant()
    for _ in range(50):
        accountant.step(noise_multiplier=1.0, sample_rate=0.1)
    with ledger.locked():
        spend = ledger.commit(accountant.state_dict(), records=100, max_grad_norm=1.0)

    shown = api.call("GET", "/v1/clients/carol/privacy", "carol").json()

    assert shown["epsilon_spent"] == pytest.approx(spend.epsilon_after)
    assert shown["epsilon_remaining"] == pytest.approx(8.0 - spend.epsilon_after)
    assert shown["spends"][0]["steps"] == 50 and shown["delta"] == pytest.approx(ledger.delta)


def test_concurrent_requests_are_batched(api):
    scheduler = api.services.scheduler
    seen_before = scheduler.max_rows_seen
    results: list[int] = []

    def ask(i: int) -> None:
        body = {"client_id": "alice", "prompt": f"Question number {i} about my dog?", "max_new_tokens": 16}
        results.append(api.call("POST", "/v1/generate", json=body).status_code)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()

    assert results == [200] * 8
    assert scheduler.max_rows_seen >= max(2, seen_before)  # several requests shared a forward pass


def test_metrics_count_requests_tokens_and_flags(api):
    api.call(
        "POST", "/v1/generate", json={"client_id": "alice", "prompt": "Tell me about quantum chromodynamics."}
    )

    text = api.call("GET", "/metrics", None).text

    assert 'pfi_rag_requests_total{method="POST",route="/v1/generate",status="200"}' in text
    assert 'pfi_rag_tokens_total{kind="completion"}' in text
    assert "pfi_rag_flagged_answers_total" in text and "pfi_rag_probe_seconds_bucket" in text
    assert "alice" not in text  # no client ids in labels


def answer_for(text: str, passages: list[UsedPassage]) -> GenerationResult:
    return GenerationResult(
        text=text,
        token_ids=[1, 2],
        passages=passages,
        adapter=ServedAdapter("alice", "base"),
        prompt_tokens=10,
        completion_tokens=2,
        finish_reason="stop",
    )


def test_serve_probes_on_the_servers_real_stores(api):
    probes = api.services.probes
    home = UsedPassage(1, "home", ALICE_DOCS[0]["text"], 0.82, 1)

    grounded = probes.run(
        "alice", "Where did I move?", answer_for("You moved to Bergen in March [1].", [home])
    )
    copied_own = probes.run(
        "alice", "dog?", answer_for("My dog is called Biscuit and loves long walks on the beach.", [home])
    )
    leaked = probes.run("alice", "key?", answer_for(BOB_SECRET + ".", [home]))
    other_pii = probes.run("alice", "phone?", answer_for("Call +47 912 34 567 now.", [home]))
    own_pii = probes.run("alice", "email?", answer_for("Write to alice@example.com, code 482913.", [home]))
    unknown_pii = probes.run("alice", "code?", answer_for("The code is 771204.", [home]))
    nothing = probes.run("alice", "?", answer_for("Bergen.", []))

    assert grounded.flags == [] and grounded.grounding == 1.0 and grounded.cited == [1]
    assert copied_own.cross_client_spans == 0 and "cross_client_copy" not in copied_own.flags
    assert leaked.cross_client_spans == len(BOB_SECRET.split()) - 8 + 1  # every 8-word span of it
    assert "cross_client_copy" in leaked.flags and "grounding" in leaked.flags
    assert other_pii.pii == [{"kind": "phone", "origin": "other-client"}] and "pii" in other_pii.flags
    assert own_pii.pii == [] and "pii" not in own_pii.flags
    assert unknown_pii.pii == [{"kind": "secret", "origin": "unknown"}]
    assert nothing.retrieval_confidence is None and nothing.flags == ["retrieval_confidence"]


def test_the_same_copy_is_fine_for_its_owner(api):
    probes = api.services.probes
    passage = UsedPassage(1, "boathouse", BOB_SECRET, 0.9, 1)
    result = answer_for(BOB_SECRET + " [1].", [passage])

    assert probes.run("bob", "Where is the key?", result).flags == []


# -- access control -------------------------------------------------------------------------------

CLIENT_ROUTES = [
    ("POST", "/v1/clients/{c}/documents", {"json": {"documents": [{"text": "intruder"}]}}),
    ("GET", "/v1/clients/{c}/documents", {}),
    ("GET", "/v1/clients/{c}/documents/home", {}),
    ("DELETE", "/v1/clients/{c}/documents/home", {}),
    ("POST", "/v1/clients/{c}/search", {"json": {"query": "Where do I live?"}}),
    ("GET", "/v1/clients/{c}/privacy", {}),
    (
        "POST",
        "/v1/generate",
        {"json": {"client_id": "{c}", "prompt": "Where do I live?", "max_new_tokens": 2}},
    ),
    ("POST", "/v1/generate", {"json": {"client_id": "{c}", "prompt": "Where?", "stream": True}}),
]


def _fill(value, client: str):
    if isinstance(value, str):
        return value.replace("{c}", client)
    if isinstance(value, dict):
        return {k: _fill(v, client) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, client) for v in value]
    return value


def test_every_client_route_is_covered_here(api):
    documented = {
        (method.upper(), path)
        for path, item in api.call("GET", "/openapi.json", None).json()["paths"].items()
        for method in item
        if path.startswith("/v1/clients/") or path == "/v1/generate"
    }
    covered = {
        (m, p.replace("{c}", "{client_id}").replace("/home", "/{doc_id}")) for m, p, _ in CLIENT_ROUTES
    }
    assert documented == covered


@pytest.mark.parametrize("method,path,kwargs", CLIENT_ROUTES)
def test_another_clients_key_sees_nothing(api, method, path, kwargs):
    as_bob = api.call(method, path.replace("{c}", "alice"), "bob", **_fill(kwargs, "alice"))
    missing = api.call(method, path.replace("{c}", "nobody"), "bob", **_fill(kwargs, "nobody"))
    admin = api.call(method, path.replace("{c}", "alice"), "admin", **_fill(kwargs, "alice"))
    anonymous = api.call(method, path.replace("{c}", "alice"), None, **_fill(kwargs, "alice"))

    assert as_bob.status_code == missing.status_code == admin.status_code == 404
    assert (
        as_bob.json()
        == missing.json()
        == admin.json()
        == {"error": {"type": "not_found", "message": "client not found"}}
    )
    assert anonymous.status_code == 401
    assert api.call("GET", "/v1/clients/alice/documents/home").status_code == 200  # untouched


def test_keys_decide_the_chat_client_and_admin_routes(api):
    admin_chat = api.call(
        "POST",
        "/v1/chat/completions",
        "admin",
        json={"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    )
    assert admin_chat.status_code == 403
    assert api.call("GET", "/v1/keys", "alice").status_code == 403
    keys = api.call("GET", "/v1/keys", "admin").json()["keys"]
    assert {k["client_id"] for k in keys} >= {"alice", "bob"} and all("digest" not in k for k in keys)

    issued = api.call("POST", "/v1/keys", "admin", json={"client_id": "dave"})
    assert issued.status_code == 201
    api.keys["dave"] = issued.json()["key"]
    assert api.call("GET", "/v1/clients/dave/documents", "dave").json() == {"documents": []}
    assert api.call("POST", "/v1/keys", "admin", json={"client_id": "dave"}).status_code == 409
    assert api.call("DELETE", "/v1/keys/dave", "admin").json() == {"revoked": 1}
    assert api.call("GET", "/v1/clients/dave/documents", "dave").status_code == 401
    assert api.keys["dave"] not in (api.root / "keys.json").read_text()


# -- bad input ------------------------------------------------------------------------------------

BAD_REQUESTS = [
    ("POST", "/v1/generate", {"content": b"{not json", "headers": {"content-type": "application/json"}}, 422),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": ""}}, 422),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": "hi", "temperature": -1}}, 422),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": "hi", "max_new_tokens": 17}}, 400),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": "word " * 2000}}, 400),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": "hi", "stop": [""]}}, 400),
    (
        "POST",
        "/v1/generate",
        {"json": {"client_id": "alice", "prompt": "hi", "stream": True, "max_new_tokens": 99}},
        400,
    ),
    ("POST", "/v1/generate", {"json": {"client_id": "alice", "prompt": "hi", "surprise": 1}}, 422),
    # The OpenAI route answers invalid requests as OpenAI does: 400, the param named.
    ("POST", "/v1/chat/completions", {"json": {"model": "m", "messages": []}}, 400),
    (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "m", "messages": [{"role": "user", "content": "x"}], "n": 9}},
        400,
    ),
    (
        "POST",
        "/v1/chat/completions",
        {"json": {"model": "m", "messages": [{"role": "tool", "content": "x"}]}},
        400,
    ),
    ("POST", "/v1/clients/alice/documents", {"json": {"documents": [{"text": "   "}]}}, 400),
    ("POST", "/v1/clients/alice/documents", {"json": {"documents": []}}, 422),
    ("POST", "/v1/clients/alice/documents", {"json": {"docs": "x"}}, 422),
    (
        "POST",
        "/v1/clients/alice/documents",
        {"content": b"text", "headers": {"content-type": "text/plain"}},
        415,
    ),
    ("POST", "/v1/clients/alice/documents", {"files": {"file": ("x.pdf", b"%PDF")}}, 400),
    ("POST", "/v1/clients/alice/documents", {"files": {"file": ("x.txt", b"\xff\xfe\x00bad")}}, 400),
    ("POST", "/v1/clients/alice/documents", {"files": {"file": ("x.jsonl", b'{"id": 1}')}}, 400),
    ("POST", "/v1/clients/alice/documents", {"files": {"doc_id": (None, "x")}}, 422),
    (  # a part with no headers: python-multipart raises its own parse error (found by schemathesis)
        "POST",
        "/v1/clients/alice/documents",
        {
            "content": b"--b0\r\n0.5--b0--\r\n",
            "headers": {"content-type": "multipart/form-data; boundary=b0"},
        },
        400,
    ),
    (
        "POST",
        "/v1/clients/alice/documents",
        {"content": b"--b0\r\n", "headers": {"content-type": "multipart/form-data"}},
        400,
    ),
    ("POST", "/v1/clients/alice/search", {"json": {"query": "x", "k": 0}}, 422),
    ("POST", "/v1/clients/alice/search", {"json": {"query": "x", "where": {"kind": ["a"]}}}, 422),
    ("GET", "/v1/nothing-here", {}, 404),
    ("PUT", "/v1/generate", {}, 405),
]


@pytest.mark.parametrize("method,path,kwargs,status", BAD_REQUESTS)
def test_bad_input_gets_a_4xx_with_a_message(api, method, path, kwargs, status):
    response = api.call(method, path, **kwargs)

    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["message"] and error["type"]
