"""One answer, as both generate and chat routes produce it: retrieve, batch, decode, probe, count.

Blocking work (retrieval, prompt building, adapter loading) runs in the thread pool; decoding
runs on the scheduler's worker, batched with every other request in flight, and the event
loop only awaits its future.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from starlette.concurrency import run_in_threadpool

from pfi_rag.api.probes import ProbeReport
from pfi_rag.api.services import Services
from pfi_rag.models import GenerationRequest, GenerationResult, TokenStream

logger = logging.getLogger(__name__)

# Below these, sampling keeps only the most likely token, i.e. it is greedy; and a temperature
# near zero (logits / T overflow) or a top_p that float32 rounds to 0 (every token dropped) make
# the sampler fail with NaN probabilities, which fails its whole decoding batch. Decode greedily.
MIN_TEMPERATURE = 1e-4
MIN_TOP_P = 1e-6


def sampling(temperature: float, top_p: float) -> dict[str, float]:
    """The engine's temperature and top_p for a request's (0 or near-0 values decode greedily)."""
    if temperature < MIN_TEMPERATURE or top_p < MIN_TOP_P:
        return {"temperature": 0.0, "top_p": 1.0}
    return {"temperature": temperature, "top_p": top_p}


@dataclass
class Answer:
    result: GenerationResult
    probes: ProbeReport
    latency_ms: float


def retrieve(services: Services, client_id: str, query: str, k: int) -> list:
    """The client's top-k passages; none for k=0 or a client that never stored a document."""
    if k == 0 or not services.stores.has_index(client_id):
        return []
    return services.stores.search(client_id, query, k)


def passages_wanted(services: Services, requested: int | None) -> int:
    k = services.cfg.retrieval.top_k if requested is None else requested
    return min(k, services.cfg.serving.max_passages)


async def prepared(services: Services, request: GenerationRequest, k: int) -> GenerationRequest:
    """``request`` with its passages retrieved (unless it has them already)."""
    if request.passages is not None:
        return request
    hits = await run_in_threadpool(retrieve, services, request.client_id, request.query, k)
    return dataclasses.replace(request, passages=hits)


Disconnected = Callable[[], Awaitable[bool]]  # Starlette's Request.is_disconnected
DISCONNECT_POLL_S = 0.25


class ClientGone(Exception):
    """The client closed its connection before its answer was ready; decoding was stopped."""


async def answer(
    services: Services, request: GenerationRequest, *, k: int, disconnected: Disconnected | None = None
) -> Answer:
    """Decode one answer; with ``disconnected``, stop decoding (ClientGone) once the client left."""
    started = time.perf_counter()
    request = await prepared(services, request, k)
    # Submitted as a stream, whose close() takes the row out of its batch: a client that leaves
    # stops costing decode steps (a plain future cannot be cancelled once decoding started).
    tokens = await run_in_threadpool(services.scheduler.submit_stream, request)  # bad input raises here
    future = asyncio.wrap_future(tokens.future)
    while not future.done():
        await asyncio.wait({future}, timeout=DISCONNECT_POLL_S)
        if not future.done() and disconnected is not None and await disconnected():
            tokens.close()
            raise ClientGone("the client disconnected before its answer was ready")
    return await finish(services, request, future.result(), started)


async def stream(
    services: Services, request: GenerationRequest, *, k: int
) -> tuple[TokenStream, GenerationRequest]:
    """Start a streamed answer; bad input raises here, before any response byte is sent."""
    request = await prepared(services, request, k)
    return await run_in_threadpool(services.scheduler.submit_stream, request), request


async def pieces(tokens: TokenStream) -> AsyncIterator[str]:
    """The stream's text pieces, read without blocking the event loop; closing stops decoding."""
    iterator = iter(tokens)
    try:
        while True:
            piece = await run_in_threadpool(next, iterator, None)
            if piece is None:
                return
            yield piece
    finally:
        tokens.close()


async def finish(
    services: Services, request: GenerationRequest, result: GenerationResult, started: float
) -> Answer:
    """Probe the answer, count it, log it if flagged."""
    report = await run_in_threadpool(services.probes.run, request.client_id, request.query, result)
    metrics = services.metrics
    metrics.answers.inc()
    metrics.tokens.labels("prompt").inc(result.prompt_tokens)
    metrics.tokens.labels("completion").inc(result.completion_tokens)
    metrics.probe_seconds.observe(report.elapsed_ms / 1000)
    for flag in report.flags:
        metrics.flagged.labels(flag).inc()
    if report.flagged:
        logger.warning(
            "flagged answer for client %s: %s (grounding %s, retrieval %s, cross-client spans %d, pii %s)",
            request.client_id,
            ", ".join(report.flags),
            report.grounding,
            report.retrieval_confidence,
            report.cross_client_spans,
            [p["kind"] + "/" + p["origin"] for p in report.pii],
        )
    return Answer(result=result, probes=report, latency_ms=(time.perf_counter() - started) * 1000)


def public(answer: Answer) -> dict:
    """The parts of an answer both APIs return: citations, adapter, probes."""
    result = answer.result
    cited = set(answer.probes.cited)
    return {
        "citations": [
            {
                "number": p.number,
                "doc_id": p.doc_id,
                "chunk": p.chunk_id,
                "score": p.score,
                "cited": p.number in cited,
            }
            for p in result.passages
        ],
        "passages_below_floor": result.passages_below_floor,
        "adapter": {
            "kind": result.adapter.kind,
            "version": result.adapter.version,
            "round": result.adapter.round,
        },
        "probes": answer.probes.as_dict(),
    }
