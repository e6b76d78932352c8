"""OpenAI-compatible chat completions: ``POST /v1/chat/completions``; the API key decides the client.

The official ``openai`` client works unchanged (``base_url=<server>/v1``, ``api_key=<key>``).
OpenAI's defaults (temperature 1, top_p 1, n 1), ``n`` answers decoded as rows of one batch,
``logprobs``/``top_logprobs`` from the model's own distribution, ``frequency_penalty``,
``presence_penalty`` and ``logit_bias`` applied in sampling; what this server cannot honour
(``tools``, ``response_format`` other than text, audio, ...) is refused with a 400 naming the
parameter. Streaming sends ``chat.completion.chunk`` objects as ``data:`` lines and ends with
``data: [DONE]``. Each answer also carries pfi-rag's citations, adapter and probes under
``pfi_rag`` (the client keeps unknown fields).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
import uuid

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pfi_rag.api import answering
from pfi_rag.api.deps import KeyClient, ServicesDep
from pfi_rag.api.errors import ApiError
from pfi_rag.api.schemas import IGNORED_FIELDS, ChatCreate, ChatPublic, OpenAIErrorResponse
from pfi_rag.models import GenerationRequest, InvalidRequest

router = APIRouter(tags=["chat"])

OPENAI_ERRORS = {
    status: {"model": OpenAIErrorResponse, "description": description}
    for status, description in [
        (400, "Invalid request; `error.param` names the field"),
        (401, "Missing or unknown API key"),
        (403, "An admin key has no client: use the client's own key"),
        (413, "Request body too large"),
        (429, "Too many requests for this key"),
    ]
}
STREAM_RESPONSE = {
    200: {
        "description": "A chat completion; with `stream: true`, `chat.completion.chunk` server-sent events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    },
    **OPENAI_ERRORS,
}
# OpenAI fields this server cannot honour, and why (a 400 names them instead of ignoring them).
UNSUPPORTED = {
    "tools": "tool calling is not supported by this server; omit tools",
    "functions": "function calling is not supported by this server; omit functions",
    "audio": "audio output is not supported; omit audio",
    "prediction": "predicted outputs are not supported; omit prediction",
    "web_search_options": "web search is not supported; omit web_search_options",
}


def invalid(param: str, message: str) -> ApiError:
    return ApiError(400, "unsupported_parameter", f"{param}: {message}", param=param)


def check_supported(body: ChatCreate) -> None:
    """Refuse, with the parameter named, what would otherwise be silently ignored."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None:
            raise invalid(name, UNSUPPORTED[name])
        if name == "modalities" and value not in (None, ["text"]):
            raise invalid(name, "only text output is supported")
        if name not in IGNORED_FIELDS and name not in UNSUPPORTED and name != "modalities":
            raise ApiError(400, "unknown_parameter", f"{name}: unrecognized request argument", param=name)
    if body.tools:
        raise invalid("tools", UNSUPPORTED["tools"])
    if body.functions:
        raise invalid("functions", UNSUPPORTED["functions"])
    for name in ("tool_choice", "function_call"):
        if getattr(body, name) not in (None, "none"):
            raise invalid(name, "tool calling is not supported by this server; omit it or send 'none'")
    if body.response_format is not None and body.response_format.get("type") != "text":
        kind = body.response_format.get("type")
        raise invalid(
            "response_format", f"{kind!r} is not supported (output cannot be constrained); use 'text'"
        )
    if body.top_logprobs and not body.logprobs:
        raise ApiError(400, "invalid_value", "top_logprobs: needs logprobs set to true", param="top_logprobs")


def logit_bias(body: ChatCreate, vocab: int) -> list[tuple[int, float]]:
    bias = []
    for key, value in (body.logit_bias or {}).items():
        if not key.isdigit() or int(key) >= vocab:
            raise ApiError(
                400,
                "invalid_value",
                f"logit_bias: {key!r} is not a token id below {vocab}",
                param="logit_bias",
            )
        if not -100 <= value <= 100:
            raise ApiError(
                400,
                "invalid_value",
                f"logit_bias: {value} for {key} is outside -100..100",
                param="logit_bias",
            )
        bias.append((int(key), float(value)))
    return bias


def to_request(client_id: str, body: ChatCreate, services) -> GenerationRequest:
    """The engine's request for ``body`` (the first of its ``n`` answers)."""
    check_supported(body)
    messages = []
    for message in body.messages:
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": message.text()})
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4 or any(not s or len(s) > 256 for s in stop):
        raise ApiError(
            400, "invalid_value", "stop: up to 4 non-empty strings of at most 256 characters", param="stop"
        )
    limit = services.cfg.serving.max_new_tokens
    max_tokens = body.max_completion_tokens or body.max_tokens
    if max_tokens is not None and max_tokens > limit:
        param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
        raise ApiError(
            400,
            "invalid_value",
            f"{param}: {max_tokens} is too large; this model answers with at most {limit} tokens",
            param=param,
        )
    temperature = 1.0 if body.temperature is None else body.temperature  # OpenAI's default
    top_p = 1.0 if body.top_p is None else body.top_p
    try:
        return GenerationRequest(
            client_id=client_id,
            messages=messages,
            max_new_tokens=max_tokens,
            **answering.sampling(temperature, top_p),
            seed=None if body.seed is None else body.seed % 2**63,
            stop=tuple(stop),
            frequency_penalty=body.frequency_penalty or 0.0,
            presence_penalty=body.presence_penalty or 0.0,
            logit_bias=logit_bias(body, len(services.engine.tokenizer)),
            logprobs=(body.top_logprobs or 0) if body.logprobs else None,
        )
    except InvalidRequest as exc:
        raise ApiError(400, "invalid_value", str(exc)) from None


def choices_of(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """``n`` rows of one request: the same prompt and passages, each with its own seed."""
    if request.seed is None:
        return [request] * n
    return [dataclasses.replace(request, seed=(request.seed + i) % 2**63) for i in range(n)]


def logprobs_public(tokenizer, steps) -> dict | None:
    if steps is None:
        return None

    def token(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {
        "content": [
            {**token(s.token_id, s.logprob), "top_logprobs": [token(t, lp) for t, lp in s.top]} for s in steps
        ]
    }


def usage(results) -> dict[str, int]:
    prompt = results[0].prompt_tokens
    completion = sum(r.completion_tokens for r in results)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def chunk(completion_id: str, created: int, model: str, choices: list[dict], **extra) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": choices,
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


@router.post("/v1/chat/completions", responses=STREAM_RESPONSE)
async def create_chat_completion(
    body: ChatCreate, client_id: KeyClient, services: ServicesDep, http: Request
) -> ChatPublic:
    """Chat with the key's client: its adapter and retrieved passages (OpenAI chat API)."""
    first = to_request(client_id, body, services)
    n = body.n or 1
    k = answering.passages_wanted(services, None)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    tokenizer = services.engine.tokenizer
    started = time.perf_counter()
    first = await answering.prepared(services, first, k)  # retrieved once for every choice
    requests = choices_of(first, n)
    if not body.stream:
        answers = await asyncio.gather(
            *(answering.answer(services, r, k=k, disconnected=http.is_disconnected) for r in requests)
        )
        extras = [answering.public(a) for a in answers]
        return ChatPublic(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                {
                    "index": i,
                    "message": {"content": a.result.text},
                    "finish_reason": a.result.finish_reason,
                    "logprobs": logprobs_public(tokenizer, a.result.logprobs),
                }
                for i, a in enumerate(answers)
            ],
            usage=usage([a.result for a in answers]),
            pfi_rag=extras[0],
            pfi_rag_choices=extras if n > 1 else None,
        )
    streams = []
    try:
        for r in requests:
            streams.append((await answering.stream(services, r, k=k))[0])
    except BaseException:  # bad input is found on the first; stop any already decoding
        for tokens in streams:
            tokens.close()
        raise
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int, tokens) -> None:
            try:
                async for piece in answering.pieces(tokens):
                    await queue.put((index, piece))
            finally:
                await queue.put((index, None))

        tasks = [asyncio.create_task(pump(i, tokens)) for i, tokens in enumerate(streams)]
        try:
            roles = [
                {"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}
                for i in range(n)
            ]
            yield chunk(completion_id, created, body.model, roles)
            running = n
            while running:
                index, piece = await queue.get()
                if piece is None:
                    running -= 1
                    continue
                yield chunk(
                    completion_id,
                    created,
                    body.model,
                    [{"index": index, "delta": {"content": piece}, "finish_reason": None}],
                )
            results = [tokens.result() for tokens in streams]
            for i, result in enumerate(results):
                answer = await answering.finish(services, requests[i], result, started)
                choice = {
                    "index": i,
                    "delta": {},
                    "finish_reason": result.finish_reason,
                    "logprobs": logprobs_public(tokenizer, result.logprobs),
                }
                yield chunk(completion_id, created, body.model, [choice], pfi_rag=answering.public(answer))
            if include_usage:
                yield chunk(completion_id, created, body.model, [], usage=usage(results))
        except Exception as exc:  # the status is already sent: report in-band, as OpenAI does
            error = {"message": str(exc), "type": "server_error", "param": None, "code": "generation_failed"}
            yield f"data: {json.dumps({'error': error})}\n\n"
        finally:
            for task in tasks:
                task.cancel()
            for tokens in streams:
                tokens.close()
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
