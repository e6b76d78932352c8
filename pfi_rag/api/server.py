"""Run the app under uvicorn: in the foreground (``pfi-rag serve``) or on a background thread.

The background form binds its own socket first, so port 0 (a free port) works and the caller
knows the address before the first request.
"""

from __future__ import annotations

import socket
import threading

import uvicorn

from pfi_rag.api.app import create_app
from pfi_rag.config import Config


def serve(cfg: Config, *, log_level: str = "info") -> None:
    """Serve ``cfg.serving.host:port`` until interrupted."""
    uvicorn.run(create_app(cfg), host=cfg.serving.host, port=cfg.serving.port, log_level=log_level)


class ServerThread:
    """A real uvicorn server on a thread; ``with ServerThread(app) as server: server.url``."""

    def __init__(self, app, *, host: str = "127.0.0.1", port: int = 0, log_level: str = "warning"):
        self.socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.socket.bind((host, port))
        self.host, self.port = self.socket.getsockname()
        self.url = f"http://{self.host}:{self.port}"
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=10))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.socket]}, daemon=True)

    def start(self, timeout: float = 300.0) -> ServerThread:
        """Start and wait until the lifespan (model loading) finished and the socket accepts."""
        self.thread.start()
        ready = threading.Event()

        def watch() -> None:
            while not self.server.started and self.thread.is_alive():
                ready.wait(0.05)
            ready.set()

        threading.Thread(target=watch, daemon=True).start()
        if not ready.wait(timeout) or not self.server.started:
            self.stop()
            why = getattr(getattr(self.app, "state", None), "startup_error", None)
            raise RuntimeError(f"the server did not start: {why or 'see its log'}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
        self.socket.close()

    def __enter__(self) -> ServerThread:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
