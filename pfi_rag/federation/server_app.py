"""Flower ServerApp: wiring only; the round loop is :func:`pfi_rag.federation.server.run_rounds`."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from pfi_rag import layout
from pfi_rag.config import Config
from pfi_rag.federation import run_dir as exchange
from pfi_rag.federation.client_app import config_from_context
from pfi_rag.federation.global_adapter import TEMPLATE, AdapterFiles, write_template
from pfi_rag.federation.records import RoundRecord
from pfi_rag.federation.server import FederationFailed, run_rounds

# How long a held round waits for the launcher's acknowledgement (its per-round work, e.g. a
# probe suite on a real model, takes minutes; a dead launcher takes this process with it).
ACK_TIMEOUT_S = 6 * 3600.0


def make_server_app(
    cfg: Config | None = None,
    *,
    on_done: Callable[[list[RoundRecord]], None] | None = None,
    on_round: Callable[[RoundRecord], None] | None = None,
    on_error: Callable[[BaseException], None] | None = None,
) -> ServerApp:
    """A ServerApp bound to ``cfg``, or reading it from the run's context.

    The callbacks let an in-process caller see each round record, the run's records, and the
    exception that ended the run (Flower logs a ServerApp's exception and exits 0). Started by
    the launcher (the run config names a ``run-dir``), the app tells it the same through files
    (:mod:`pfi_rag.federation.run_dir`), and leaves the fresh adapter there
    (:data:`~pfi_rag.federation.global_adapter.TEMPLATE`), so this process needs no model.
    """
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        run_cfg = cfg if cfg is not None else config_from_context(context)
        run_dir = Path(str(context.run_config["run-dir"])) if context.run_config.get("run-dir") else None
        hold = run_dir is not None and bool(context.run_config.get("hold-rounds"))
        if int(context.run_config.get("launcher-pid") or 0) > 0:
            exchange.watch_launcher(int(context.run_config["launcher-pid"]))

        def round_done(record: RoundRecord) -> None:
            if on_round is not None:
                on_round(record)
            if hold and not exchange.wait_for_ack(run_dir, record.round, ACK_TIMEOUT_S):
                raise FederationFailed(
                    f"the launcher did not take round {record.round} within {ACK_TIMEOUT_S:.0f} s"
                )

        try:
            template = run_dir / TEMPLATE if run_dir is not None else None
            if template is None or not template.is_dir():  # a deployment: no launcher wrote one
                template = write_template(run_cfg, layout.federation_dir(run_cfg.data_root) / TEMPLATE)
            records = run_rounds(grid, run_cfg, AdapterFiles(template), on_round=round_done)
        except BaseException as exc:
            if run_dir is not None:
                exchange.write_error(run_dir, exc)
            if on_error is not None:
                on_error(exc)
            raise
        if run_dir is not None:
            exchange.mark_finished(run_dir)
        if on_done is not None:
            on_done(records)

    return app


app = make_server_app()
