"""Batch concurrent requests, each with its own adapter, into one forward pass per decoding step.

One worker thread owns decoding. ``submit`` (any thread) prepares a request in the caller's
thread (retrieval, prompt, adapter: bad input raises there, before anything is queued) and
returns a ``concurrent.futures.Future``; async code awaits it with ``asyncio.wrap_future``.

Admission: an idle worker waits for a first request, then up to ``max_wait_ms`` for more, up
to ``max_batch_size``. While a batch runs, queued requests join it between steps (continuous
admission) and finished rows leave at once, so a short answer never waits for a long one.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future

from pfi_rag.models.decoding import Row
from pfi_rag.models.generation import Engine, GenerationRequest, GenerationResult, PreparedRequest

logger = logging.getLogger(__name__)


class SchedulerStopped(RuntimeError):
    """The scheduler is not running (never started, or stopped)."""


class TokenStream:
    """Text pieces of one answer as they are decoded; ``result()`` gives the full result at the end."""

    _END = object()

    def __init__(self) -> None:
        self.future: Future[GenerationResult] = Future()
        self._pieces: queue.Queue = queue.Queue()
        self.closed = False
        self.future.add_done_callback(lambda _: self._pieces.put(self._END))

    def _put(self, piece: str) -> None:
        self._pieces.put(piece)

    def __iter__(self) -> Iterator[str]:
        while True:
            piece = self._pieces.get()
            if piece is self._END:
                break
            yield piece
        self.future.result()  # re-raise a failure after the pieces that did arrive

    def result(self, timeout: float | None = None) -> GenerationResult:
        return self.future.result(timeout)

    def close(self) -> None:
        """Stop generating this answer (the reader went away)."""
        self.closed = True


class BatchScheduler:
    """Serves submitted requests in mixed-adapter batches on one worker thread."""

    def __init__(
        self, engine: Engine, *, max_batch_size: int | None = None, max_wait_ms: float | None = None
    ):
        self.engine = engine
        self.max_batch_size = max_batch_size or engine.serving.max_batch_size
        self.max_wait_s = (engine.serving.max_wait_ms if max_wait_ms is None else max_wait_ms) / 1000
        self._queue: queue.Queue[tuple[PreparedRequest, Future, TokenStream | None]] = queue.Queue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self.batches = 0  # forward passes run, for tests and metrics
        self.max_rows_seen = 0

    def start(self) -> BatchScheduler:
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stopping.clear()
        self._thread = threading.Thread(target=self._run, name="pfi-rag-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Finish nothing more: running and queued requests fail with :class:`SchedulerStopped`."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def __enter__(self) -> BatchScheduler:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def submit(self, request: GenerationRequest) -> Future[GenerationResult]:
        return self._enqueue(request, None)

    def submit_stream(self, request: GenerationRequest) -> TokenStream:
        stream = TokenStream()
        self._enqueue(request, stream)
        return stream

    def _enqueue(self, request: GenerationRequest, stream: TokenStream | None) -> Future[GenerationResult]:
        if self._thread is None or self._stopping.is_set():
            raise SchedulerStopped("the scheduler is not running: call start() first")
        job = self.engine.prepare(request, on_text=stream._put if stream is not None else None)
        future = stream.future if stream is not None else Future()
        self._queue.put((job, future, stream))
        return future

    def _take(self, limit: int, *, wait: bool) -> list[tuple[PreparedRequest, Future, TokenStream | None]]:
        """Up to ``limit`` queued requests; with ``wait``, block for one, then up to max_wait for more."""
        taken = []
        deadline = None
        while len(taken) < limit and not self._stopping.is_set():
            if wait and not taken:
                timeout = 0.1  # wake up to notice stop()
            elif wait:
                deadline = deadline or time.monotonic() + self.max_wait_s
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
            else:
                timeout = None
            try:
                item = self._queue.get(timeout=timeout) if timeout is not None else self._queue.get_nowait()
            except queue.Empty:
                if wait and not taken:
                    continue
                break
            if item[1].set_running_or_notify_cancel():
                taken.append(item)
            else:
                item[0].lease.release()  # cancelled while queued
        return taken

    def _run(self) -> None:
        batch = self.engine.new_batch()
        running: dict[Row, tuple[PreparedRequest, Future, TokenStream | None]] = {}
        while not self._stopping.is_set():
            try:
                room = self.max_batch_size - len(batch)
                joining = self._take(room, wait=not len(batch)) if room > 0 and batch.can_join() else []
                if joining:
                    running.update({job.row: (job, fut, s) for job, fut, s in joining})
                    self._complete(batch.add([job.row for job, _, _ in joining]), running)
                closed = [row for row, (_, _, s) in running.items() if s is not None and s.closed]
                if closed:
                    batch.cancel(closed)
                    self._complete(closed, running)
                if len(batch):
                    self.max_rows_seen = max(self.max_rows_seen, len(batch))
                    self._complete(batch.step(), running)
                    self.batches += 1
            except Exception as exc:  # a failed forward pass fails its rows, not the server
                logger.exception("decoding failed; failing %d requests", len(running))
                self._fail(running, exc)
                batch = self.engine.new_batch()
        self._fail(running, SchedulerStopped("the scheduler stopped"))
        while True:
            try:
                job, future, _ = self._queue.get_nowait()
            except queue.Empty:
                break
            job.lease.release()
            if future.set_running_or_notify_cancel():
                future.set_exception(SchedulerStopped("the scheduler stopped"))

    def _complete(self, rows: list[Row], running: dict) -> None:
        for row in rows:
            job, future, _ = running.pop(row)
            future.set_result(self.engine.finish(job))

    def _fail(self, running: dict, exc: BaseException) -> None:
        for job, future, _ in running.values():
            job.lease.release()
            future.set_exception(exc)
        running.clear()
