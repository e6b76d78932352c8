"""`pfi-rag serve|clients`: the HTTP service and its per-client API keys."""

from __future__ import annotations

import typer
from rich.table import Table

from pfi_rag.cli.common import config_from, console, err_console, fail, print_json


def _keys(ctx: typer.Context):
    from pfi_rag.api.auth import KeyStore, keys_path

    cfg = config_from(ctx)
    return KeyStore(keys_path(cfg.data_root, cfg.serving.keys_file))


def register(app: typer.Typer) -> None:
    @app.command("serve")
    def serve(
        ctx: typer.Context,
        host: str = typer.Option(None, "--host", help="Interface to listen on (default serving.host)."),
        port: int = typer.Option(None, "--port", min=1, max=65535, help="Port (default serving.port)."),
        log_level: str = typer.Option("info", "--log-level", help="uvicorn log level."),
    ) -> None:
        """Serve personalized generation over HTTP (OpenAPI at /docs; OpenAI-compatible chat)."""
        import os

        from pfi_rag.api.server import serve as run
        from pfi_rag.api.services import DataRootBusy, hold_data_root

        cfg = config_from(ctx, **{"serving.host": host, "serving.port": port})
        try:  # refuse before loading any model; the server takes the lock again as it starts
            os.close(hold_data_root(cfg.data_root))
        except DataRootBusy as exc:
            fail(str(exc))
        os.umask(0o077)  # every file the server writes (documents, keys, adapters) is owner-only
        err_console.print(
            f"pfi-rag: serving on http://{cfg.serving.host}:{cfg.serving.port} "
            f"(generator {cfg.models.generator}); keys: `pfi-rag clients create ID`"
        )
        run(cfg, log_level=log_level)

    clients = typer.Typer(
        help="Create clients and their API keys (only hashes are stored).", no_args_is_help=True
    )
    app.add_typer(clients, name="clients")

    @clients.command("create")
    def create(
        ctx: typer.Context,
        client_id: str = typer.Argument(None, help="The client's id (omit with --admin)."),
        admin: bool = typer.Option(False, "--admin", help="Create an admin key (manages keys via /v1/keys)."),
        json_out: bool = typer.Option(False, "--json", help="Print the key and its record as JSON."),
    ) -> None:
        """Issue an API key; it is printed once and only its hash is stored."""
        _issue(ctx, client_id, admin=admin, replace=False, json_out=json_out)

    @clients.command("rotate")
    def rotate(
        ctx: typer.Context,
        client_id: str = typer.Argument(..., help="The client whose key to replace."),
        json_out: bool = typer.Option(False, "--json"),
    ) -> None:
        """Replace a client's key: the old one stops working at once."""
        _issue(ctx, client_id, admin=False, replace=True, json_out=json_out)

    @clients.command("list")
    def list_keys(ctx: typer.Context, json_out: bool = typer.Option(False, "--json")) -> None:
        """Keys by owner and creation time (never the keys)."""
        records = [record.public() for record in _keys(ctx).records()]
        if json_out:
            print_json(records)
            return
        table = Table("client", "key id", "admin", "created")
        for r in records:
            table.add_row(r["client_id"] or "-", r["key_id"], "yes" if r["admin"] else "", r["created_at"])
        console.print(table)

    @clients.command("revoke")
    def revoke(
        ctx: typer.Context,
        client_id: str = typer.Argument(..., help="The client whose keys to revoke ('admin': admin keys)."),
    ) -> None:
        """Revoke every key of a client; its documents stay."""
        removed = _keys(ctx).revoke(client_id)
        if not removed:
            fail(f"no key for {client_id!r}")
        console.print(f"revoked {removed} key(s) of {client_id}")


def _issue(ctx: typer.Context, client_id: str | None, *, admin: bool, replace: bool, json_out: bool) -> None:
    from pfi_rag.api.auth import KeyStoreError
    from pfi_rag.layout import InvalidClientId

    if admin and client_id is not None:
        fail("give a client id or --admin, not both")
    if not admin and client_id is None:
        fail("give the client's id, e.g. `pfi-rag clients create client-00`, or --admin")
    try:
        key, record = _keys(ctx).create(client_id, admin=admin, replace=replace)
    except (KeyStoreError, InvalidClientId) as exc:
        fail(str(exc))
    if json_out:
        print_json({**record.public(), "key": key})
        return
    owner = "admin" if admin else f"client {client_id}"
    err_console.print(f"API key for {owner} (shown once; only its hash is stored):")
    console.print(key, highlight=False, soft_wrap=True)
