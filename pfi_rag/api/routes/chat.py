"""OpenAI-compatible chat completions: ``POST /v1/chat/completions``; the API key decides the client.

The official ``openai`` client works unchanged (``base_url=<server>/v1``, ``api_key=<key>``).
Streaming sends ``chat.completion.chunk`` objects as ``data:`` lines and ends with
``data: [DONE]``. Each answer also carries pfi-rag's citations, adapter and probes under
``pfi_rag`` (the client keeps unknown fields).
"""

from __future__ import annotations

import json
import time
import uuid

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from pfi_rag.api import answering
from pfi_rag.api.deps import KeyClient, ServicesDep
from pfi_rag.api.errors import ERROR_RESPONSES
from pfi_rag.api.schemas import ChatCreate, ChatPublic
from pfi_rag.models import GenerationRequest, InvalidRequest

router = APIRouter(tags=["chat"], responses=ERROR_RESPONSES)

STREAM_RESPONSE = {
    200: {
        "description": "A chat completion; with `stream: true`, `chat.completion.chunk` server-sent events.",
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def to_request(client_id: str, body: ChatCreate) -> GenerationRequest:
    messages = []
    for message in body.messages:
        content = message.content
        text = content if isinstance(content, str) else "".join(part.text for part in content)
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": text})
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise InvalidRequest("stop: at most 4 stop strings")
    return GenerationRequest(
        client_id=client_id,
        messages=messages,
        max_new_tokens=body.max_completion_tokens or body.max_tokens,
        **answering.sampling(body.temperature, body.top_p),
        seed=body.seed,
        stop=tuple(stop),
    )


def chunk(completion_id: str, created: int, model: str, delta: dict, finish_reason=None, **extra) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        **extra,
    }
    return f"data: {json.dumps(body)}\n\n"


@router.post("/v1/chat/completions", responses=STREAM_RESPONSE)
async def create_chat_completion(body: ChatCreate, client_id: KeyClient, services: ServicesDep) -> ChatPublic:
    """Chat with the key's client: its adapter and retrieved passages (OpenAI chat API)."""
    request = to_request(client_id, body)
    k = answering.passages_wanted(services, None)
    completion_id = f"chatcmpl-{uuid.uuid4().hex}"
    created = int(time.time())
    if not body.stream:
        answer = await answering.answer(services, request, k=k)
        result = answer.result
        return ChatPublic(
            id=completion_id,
            created=created,
            model=body.model,
            choices=[
                {"index": 0, "message": {"content": result.text}, "finish_reason": result.finish_reason}
            ],
            usage={
                "prompt_tokens": result.prompt_tokens,
                "completion_tokens": result.completion_tokens,
                "total_tokens": result.prompt_tokens + result.completion_tokens,
            },
            pfi_rag=answering.public(answer),
        )
    started = time.perf_counter()
    tokens, request = await answering.stream(services, request, k=k)
    include_usage = body.stream_options is not None and body.stream_options.include_usage

    async def events():
        try:
            yield chunk(completion_id, created, body.model, {"role": "assistant", "content": ""})
            async for piece in answering.pieces(tokens):
                yield chunk(completion_id, created, body.model, {"content": piece})
            answer = await answering.finish(services, request, tokens.result(), started)
            result = answer.result
            yield chunk(
                completion_id, created, body.model, {}, result.finish_reason, pfi_rag=answering.public(answer)
            )
            if include_usage:
                usage = {
                    "prompt_tokens": result.prompt_tokens,
                    "completion_tokens": result.completion_tokens,
                    "total_tokens": result.prompt_tokens + result.completion_tokens,
                }
                yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'created': created, 'model': body.model, 'choices': [], 'usage': usage})}\n\n"  # noqa: E501
        except Exception as exc:  # the status is already sent: report in-band, as OpenAI does
            yield f"data: {json.dumps({'error': {'type': 'generation_failed', 'message': str(exc)}})}\n\n"
        yield "data: [DONE]\n\n"

    return StreamingResponse(events(), media_type="text/event-stream")
