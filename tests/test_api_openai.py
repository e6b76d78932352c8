"""The official ``openai`` client against a real server: what OpenAI clients and scanners expect.

Models listing, ``n`` answers, logprobs, penalties and logit bias, stop, streaming with usage,
OpenAI's defaults and error shape (400 naming the param) on the OpenAI routes, the product's own
shape elsewhere, and a client that leaves counted as a disconnect (499), not a 500.
"""

from __future__ import annotations

import socket
import time

import httpx
import openai
import pytest

from pfi_rag.config import ServingConfig

FORCED = 1000  # a token id every test can force with logit_bias
ASK = [{"role": "user", "content": "Tell me about my notes."}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, live_service):
    serving = ServingConfig(max_new_tokens=400, max_prompt_tokens=512, requests_per_minute=100_000)
    with live_service(tmp_path_factory.mktemp("openai"), serving=serving) as running:
        key = running.keys["alice"]
        http = httpx.Client(base_url=running.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)
        http.post("/v1/clients/alice/documents", json={"documents": [{"text": "My notes are about birds."}]})
        client = openai.OpenAI(base_url=running.url + "/v1", api_key=key, max_retries=0)
        yield client, http, running.app
        http.close()


def test_models_list_and_retrieve(server):
    client, _, _ = server

    assert [m.id for m in client.models.list()] == ["tiny-random"]
    assert client.models.retrieve("tiny-random").owned_by == "pfi-rag"
    with pytest.raises(openai.NotFoundError) as missing:
        client.models.retrieve("gpt-9")
    assert missing.value.body["param"] == "model"


def test_n_choices_and_openai_default_temperature(server):
    client, _, _ = server

    seeded = client.chat.completions.create(model="m", messages=ASK, n=2, max_tokens=6, seed=7)
    unseeded = client.chat.completions.create(model="m", messages=ASK, n=2, max_tokens=6)

    assert [c.index for c in seeded.choices] == [0, 1]
    assert seeded.usage.completion_tokens == 12 or seeded.usage.completion_tokens <= 12
    # temperature omitted = 1 (OpenAI's default): two samples from a random model's flat distribution
    # differ; the old default (greedy) gave two identical answers.
    assert unseeded.choices[0].message.content != unseeded.choices[1].message.content


def test_logprobs_with_top_alternatives(server):
    client, _, _ = server

    answer = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=5, temperature=0, logprobs=True, top_logprobs=2
    )

    content = answer.choices[0].logprobs.content
    assert len(content) == answer.usage.completion_tokens == 5
    for step in content:
        assert len(step.top_logprobs) == 2 and step.top_logprobs[0].logprob >= step.top_logprobs[1].logprob
        assert step.token == step.top_logprobs[0].token and step.logprob <= 0  # greedy took the best


def test_logit_bias_penalties_and_stop_change_the_answer(server):
    client, _, app = server
    forced = app.state.services.engine.tokenizer.decode([FORCED])

    biased = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=4, temperature=0, logit_bias={str(FORCED): 100}, logprobs=True
    )
    penalised = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=4, temperature=0, logit_bias={str(FORCED): 3}, frequency_penalty=2
    )
    stopped = client.chat.completions.create(
        model="m", messages=ASK, max_tokens=4, temperature=0, logit_bias={str(FORCED): 100}, stop=[forced]
    )

    assert [s.token for s in biased.choices[0].logprobs.content] == [forced] * 4
    assert penalised.choices[0].message.content != forced * 4  # repeats cost 2 each: the bias loses
    assert stopped.choices[0].message.content == "" and stopped.choices[0].finish_reason == "stop"


def test_streaming_with_usage_equals_the_plain_answer(server):
    client, _, _ = server
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0)

    chunks = list(
        client.chat.completions.create(
            model="m",
            messages=ASK,
            max_tokens=8,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )

    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == plain.usage.completion_tokens


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
        ({"tool_choice": "required"}, "tool_choice"),
        ({"response_format": {"type": "json_object"}}, "response_format"),
        ({"extra_body": {"audio": {"voice": "alloy"}}}, "audio"),
        ({"extra_body": {"no_such_thing": 1}}, "no_such_thing"),
        ({"temperature": 5}, "temperature"),
        ({"max_tokens": 100_000}, "max_tokens"),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logit_bias": {"not-a-token": 1}}, "logit_bias"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages"),  # over the prompt limit
    ],
)
def test_unsupported_or_invalid_parameters_get_a_400_naming_them(server, extra, param):
    client, _, _ = server

    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 2, **extra})

    error = refused.value.body
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and "serving." not in error["message"]


def test_chat_messages_have_a_length_cap(server):
    _, http, _ = server
    long = [{"role": "user", "content": "word " * 20_001}]  # 100,005 characters

    response = http.post("/v1/chat/completions", json={"model": "m", "messages": long})

    assert response.status_code == 400 and response.json()["error"]["param"] == "messages.0.content"


def test_product_routes_keep_the_product_error_shape(server):
    _, http, _ = server

    response = http.post("/v1/generate", json={"client_id": "alice", "prompt": "hi", "temperature": 5})

    assert response.status_code == 422 and set(response.json()["error"]) == {"type", "message"}


def disconnects(http: httpx.Client, route: str) -> float:
    text = http.get("/metrics").text
    line = f'pfi_rag_requests_total{{method="POST",route="{route}",status="499"}}'
    values = [float(row.split()[-1]) for row in text.splitlines() if row.startswith(line)]
    return values[0] if values else 0.0


def raw_request(url: str, head: str, body: bytes) -> None:
    """Send a request (maybe incomplete) and hang up without reading the answer."""
    host, port = url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(head.encode() + body)
        time.sleep(0.5)


def test_clients_that_leave_are_counted_as_disconnects_and_stop_decoding(server):
    client, http, app = server
    url, key = str(http.base_url).rstrip("/"), http.headers["Authorization"]
    half = b'{"documents": [{"text": "half'
    head = (
        f"POST /v1/clients/alice/documents HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(half) * 10}\r\n\r\n"
    )
    chat = b'{"model": "m", "messages": [{"role": "user", "content": "Talk."}], "max_tokens": 400}'
    chat_head = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {key}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(chat)}\r\n\r\n"
    )
    before = disconnects(http, "/v1/clients/{client_id}/documents"), disconnects(http, "/v1/chat/completions")
    batches = app.state.services.scheduler.batches

    raw_request(url, head, half)  # half a body, then gone
    raw_request(url, chat_head, chat)  # a 400-token answer, but nobody waits for it
    time.sleep(1.0)
    deadline = time.monotonic() + 60
    while disconnects(http, "/v1/chat/completions") == before[1] and time.monotonic() < deadline:
        time.sleep(0.2)

    assert disconnects(http, "/v1/clients/{client_id}/documents") == before[0] + 1
    assert disconnects(http, "/v1/chat/completions") == before[1] + 1
    assert app.state.services.scheduler.batches - batches < 400  # decoding stopped before the end
    assert 'status="500"' not in http.get("/metrics").text
