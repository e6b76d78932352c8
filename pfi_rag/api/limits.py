"""Request limits that sit in front of the routes: body size (ASGI middleware) and rate per key."""

from __future__ import annotations

import asyncio
import json
import math
import threading
import time

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pfi_rag.api.compat import is_openai_path, openai_error


async def _send_error(send: Send, status: int, error_type: str, message: str, path: str = "") -> None:
    shaped = {"error": {"type": error_type, "message": message}}
    if is_openai_path(path):
        status, shaped = openai_error(status, error_type, message)
    body = json.dumps(shaped).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


BODY_TIMEOUT_S = 30.0  # to send a whole request body; a 2 MB body needs ~0.6 Mbit/s


class BodyLimit:
    """Refuse bodies over ``max_bytes`` with 413 (by Content-Length or while reading) and bodies not
    sent within ``timeout_s`` with 408.

    The body is read in full before the app sees it (at most ``max_bytes``), so an oversized
    chunked upload is refused cleanly instead of failing half-way through a handler; and a
    client that sends half a body and waits holds its connection for ``timeout_s`` at most.
    """

    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        too_big = f"request body is over the limit of {self.max_bytes} bytes (serving.max_body_bytes)"
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            if not length.isdigit():
                await _send_error(
                    send, 400, "invalid_request", "Content-Length is not a number", scope["path"]
                )
                return
            if int(length) > self.max_bytes:
                await _send_error(send, 413, "body_too_large", too_big, scope["path"])
                return
        chunks: list[bytes] = []
        size = 0
        deadline = asyncio.get_running_loop().time() + self.timeout_s
        while True:
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                message = f"the request body did not arrive within {self.timeout_s:g} s; send it at once"
                await _send_error(send, 408, "request_timeout", message, scope["path"])
                return
            if message["type"] == "http.disconnect":
                return  # nothing to answer; the metrics count a disconnect
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                await _send_error(send, 413, "body_too_large", too_big, scope["path"])
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # after the body: wait for the disconnect, as Starlette expects

        await self.app(scope, replay, send)


class RateLimiter:
    """A token bucket per API key: ``per_minute`` requests, refilled continuously."""

    def __init__(self, per_minute: int):
        self.capacity = float(per_minute)
        self.rate = per_minute / 60.0  # tokens per second
        self._buckets: dict[str, tuple[float, float]] = {}  # key id -> (tokens, last refill)
        self._lock = threading.Lock()

    def take(self, key_id: str) -> float:
        """0 if the request may go ahead, else the seconds until it could."""
        now = time.monotonic()
        with self._lock:
            tokens, last = self._buckets.get(key_id, (self.capacity, now))
            tokens = min(self.capacity, tokens + (now - last) * self.rate)
            if tokens >= 1:
                self._buckets[key_id] = (tokens - 1, now)
                return 0.0
            self._buckets[key_id] = (tokens, now)
            return math.ceil((1 - tokens) / self.rate * 1000) / 1000
