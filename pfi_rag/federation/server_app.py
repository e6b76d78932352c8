"""Flower ServerApp: wiring only; the round loop is :func:`pfi_rag.federation.server.run_rounds`."""

from __future__ import annotations

from collections.abc import Callable

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pfi_rag.config import Config
from pfi_rag.federation.client_app import config_from_context
from pfi_rag.federation.records import RoundRecord
from pfi_rag.federation.server import run_rounds
from pfi_rag.federation.task import fresh_adapter


def make_server_app(
    cfg: Config | None = None,
    *,
    on_done: Callable[[list[RoundRecord]], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``cfg`` (the launcher), or reading it from the run's context.

    The callbacks let an in-process launcher see each round record, the run's records, and
    the exception that ended the run (Flower logs a ServerApp's exception and exits 0).
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_context(context)
        try:
            records = run_rounds(grid, run_cfg, lambda: fresh_adapter(run_cfg)[0], on_round=on_round)
        except BaseException as exc:
            if on_error is not None:
                on_error(exc)
            raise
        if on_done is not None:
            on_done(records)

    return app


app = make_server_app()
