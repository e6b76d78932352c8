"""Personalized, retrieval-grounded generation: ``POST /v1/generate`` (JSON or server-sent events)."""

from __future__ import annotations

import json
import time

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from pfi_rag.api import answering
from pfi_rag.api.deps import CurrentPrincipal, ServicesDep
from pfi_rag.api.errors import ERROR_RESPONSES, not_found
from pfi_rag.api.schemas import GenerateCreate, GeneratePublic
from pfi_rag.models import GenerationRequest

router = APIRouter(tags=["generation"], responses=ERROR_RESPONSES)

STREAM_RESPONSE = {
    200: {
        "description": "The answer; with `stream: true`, server-sent events: `token` events with "
        '`{"text": piece}`, then one `result` event with the full answer (or an `error` event).',
        "content": {"text/event-stream": {"schema": {"type": "string"}}},
    }
}


def sse(event: str, data: dict) -> str:
    return f"event: {event}\ndata: {json.dumps(data)}\n\n"


def response_body(answer: answering.Answer) -> dict:
    result = answer.result
    return {
        "text": result.text,
        "finish_reason": result.finish_reason,
        **answering.public(answer),
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "latency_ms": answer.latency_ms,
        },
    }


@router.post("/v1/generate", responses=STREAM_RESPONSE)
async def generate(
    body: GenerateCreate, principal: CurrentPrincipal, services: ServicesDep, http: Request
) -> GeneratePublic:
    """Answer a prompt as a client: its adapter, its retrieved passages, probes on the answer."""
    if principal.client_id is None or principal.client_id != body.client_id:
        raise not_found()
    request = GenerationRequest(
        client_id=body.client_id,
        question=body.prompt,
        max_new_tokens=body.max_new_tokens,
        **answering.sampling(body.temperature, body.top_p),
        top_k=body.top_k,
        seed=body.seed,
        stop=tuple(body.stop),
    )
    k = answering.passages_wanted(services, body.passages)
    if not body.stream:
        answer = await answering.answer(services, request, k=k, disconnected=http.is_disconnected)
        return GeneratePublic(**response_body(answer))
    started = time.perf_counter()
    tokens, request = await answering.stream(services, request, k=k)

    async def events():
        try:
            async for piece in answering.pieces(tokens):
                yield sse("token", {"text": piece})
            answer = await answering.finish(services, request, tokens.result(), started)
            yield sse("result", GeneratePublic(**response_body(answer)).model_dump())
        except Exception as exc:  # the status is already sent: report in-band
            yield sse("error", {"error": {"type": "generation_failed", "message": str(exc)}})

    return StreamingResponse(events(), media_type="text/event-stream")
