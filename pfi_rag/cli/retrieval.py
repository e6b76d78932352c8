"""`pfi-rag ingest|search|docs`: each client's local document index."""

from __future__ import annotations

import fcntl
import json
import os
from collections.abc import Iterator
from contextlib import contextmanager
from enum import StrEnum
from pathlib import Path
from typing import Any

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from pfi_rag.cli.common import config_from, console, err_console, fail, print_json
from pfi_rag.config import Config

SEARCH_ROUTE = (
    "curl -s {base}/v1/clients/{client}/search -H \"Authorization: Bearer $KEY\" "
    "-H 'Content-Type: application/json' -d '{\"query\": \"...\", \"k\": 5}'"
)
DOCUMENTS_ROUTE = "POST/GET/DELETE {base}/v1/clients/{client}/documents"
CLIENT_HELP = "Client id (a-z, 0-9, '_', '-'; its store lives under <data_root>/clients/<id>/index/)."


class DocsAction(StrEnum):
    list = "list"
    show = "show"
    delete = "delete"


@contextmanager
def _open_store(cfg: Config, client: str, route: str) -> Iterator[Any]:
    """The client's store, with every expected failure turned into one line and exit 2.

    ``route`` is the HTTP route that does the same job, named when a server holds the store.
    """
    from pfi_rag.retriever import RetrieverError, StoreBusy

    _check_client(client)
    fail_if_busy(cfg, client, route)  # before loading a model for nothing
    from pfi_rag.models.loading import load_embedder
    from pfi_rag.retriever import ClientStore

    err_console.print(f"loading the embedder ({cfg.models.embedder})", highlight=False)
    embedder = load_embedder(cfg.models)
    try:
        with ClientStore.open(cfg.data_root, client, cfg.retrieval, embedder) as store:
            yield store
    except StoreBusy:
        fail(busy_message(cfg, client, route))
    except RetrieverError as exc:
        fail(str(exc))


def busy_message(cfg: Config, client: str, route: str) -> str:
    """What to do when another process (usually `pfi-rag serve`) holds the client's store."""
    base = f"http://{cfg.serving.host}:{cfg.serving.port}"
    return (
        f"client {client}'s store is held by another process, such as a running `pfi-rag serve` "
        f"(a server keeps the stores it opened until it stops); while it runs, use its HTTP API "
        f"with the client's key: {route.replace('{base}', base).replace('{client}', client)}"
    )


def fail_if_busy(cfg: Config, client: str, route: str) -> None:
    """Exit 2 with :func:`busy_message` if another process holds the client's store lock now.

    ClientStore.open takes the same flock (index/lock) and stays the authority; this only saves
    loading a model first. The probe's own lock is released when its descriptor closes.
    """
    from pfi_rag.layout import client_store_lock_file

    lock = client_store_lock_file(cfg.data_root, client)
    if not lock.is_file():
        return
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        fail(busy_message(cfg, client, route))
    finally:
        os.close(fd)


def _check_client(client: str) -> None:
    """Refuse a bad --client before reading files or loading a model."""
    from pfi_rag.layout import InvalidClientId, validate_client_id

    try:
        validate_client_id(client)
    except InvalidClientId as exc:
        fail(f"--client: {exc}")


def _parse_where(items: list[str]) -> dict[str, Any]:
    """``key=value`` pairs; the value is read as JSON when it parses (numbers, true), else text."""
    where: dict[str, Any] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            fail(f"--where {item!r}: use key=value, e.g. --where kind=email")
        try:
            where[key] = json.loads(raw)
        except json.JSONDecodeError:
            where[key] = raw
    return where


def register(app: typer.Typer) -> None:
    @app.command("ingest")
    def ingest(
        ctx: typer.Context,
        paths: list[Path] = typer.Argument(
            None, help=".txt/.md files, JSONL files of documents, or directories."
        ),
        client: str = typer.Option(..., "--client", help=CLIENT_HELP),
        text: str = typer.Option(None, "--text", help="Add this text as one document."),
        doc_id: str = typer.Option(None, "--id", help="Document id for --text (default: from its hash)."),
        json_out: bool = typer.Option(False, "--json", help="Print the report as JSON."),
    ) -> None:
        """Add documents (text, .txt/.md files, JSONL) to a client's index."""
        from pfi_rag.retriever import RetrieverError
        from pfi_rag.retriever.sources import check_document, read_paths, text_document

        cfg = config_from(ctx)
        _check_client(client)
        if not paths and text is None:
            fail("give files to ingest (PATH...) or --text 'some text'")
        try:  # read and check every input before loading a model or touching the store
            batches = read_paths(paths or [], cfg.retrieval.max_file_bytes)
            if text is not None:
                doc = check_document(text_document(text, doc_id), cfg.retrieval.max_file_bytes, "--text")
                batches.append(("cli-text", [doc]))
        except RetrieverError as exc:
            fail(str(exc))
        total_docs = sum(len(docs) for _, docs in batches)
        totals = {"added": 0, "unchanged": 0, "superseded": 0, "chunks": 0}
        with _open_store(cfg, client, DOCUMENTS_ROUTE) as store:
            columns = (
                TextColumn("{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
            )
            with Progress(*columns, console=console, disable=json_out, transient=True) as bar:
                task = bar.add_task(f"ingesting into {client}", total=total_docs)
                for source, docs in batches:
                    report = store.add_documents(docs, source=source, progress=lambda n: bar.advance(task, n))
                    for key, value in report.as_dict().items():
                        totals[key] += value
            stats = store.stats()
        if json_out:
            print_json({"report": totals, "stats": stats})
            return
        console.print(
            f"{client}: {totals['added']} added, {totals['superseded']} superseded, "
            f"{totals['unchanged']} unchanged, {totals['chunks']} chunks indexed; the store now holds "
            f"{stats['documents']} documents in {stats['chunks']} chunks ({stats['index']} index)"
        )

    @app.command("search")
    def search(
        ctx: typer.Context,
        query: str = typer.Argument(..., help="What to look for."),
        client: str = typer.Option(..., "--client", help=CLIENT_HELP),
        k: int = typer.Option(
            None, "-k", "--k", min=1, max=1000, help="Hits to return (default: retrieval.top_k)."
        ),
        where: list[str] = typer.Option(
            [], "--where", help="Metadata filter key=value (repeatable; all must match)."
        ),
        json_out: bool = typer.Option(False, "--json", help="Print hits as JSON."),
    ) -> None:
        """Search a client's index."""
        from pfi_rag.retriever import RetrieverError

        cfg = config_from(ctx)
        filters = _parse_where(where)
        with _open_store(cfg, client, SEARCH_ROUTE) as store:
            try:
                hits = store.search(query, k, filters or None)
            except RetrieverError as exc:
                fail(str(exc))
        if json_out:
            print_json([hit.__dict__ for hit in hits])
            return
        table = Table(title=f"{client}: {query}")
        for column in ("#", "score", "document", "v", "text"):
            table.add_column(column)
        for rank, hit in enumerate(hits, start=1):
            table.add_row(str(rank), f"{hit.score:.3f}", hit.doc_id, str(hit.version), hit.text)
        console.print(table if hits else f"{client}: no documents match")

    @app.command("docs")
    def docs(
        ctx: typer.Context,
        action: DocsAction = typer.Argument(..., help="list | show DOC | delete DOC"),
        doc_id: str = typer.Argument(None, help="The document id (show, delete)."),
        client: str = typer.Option(..., "--client", help=CLIENT_HELP),
        json_out: bool = typer.Option(False, "--json", help="Print as JSON."),
    ) -> None:
        """List, show (every version) or delete a client's documents."""
        cfg = config_from(ctx)
        if action is not DocsAction.list and not doc_id:
            fail(
                f"`docs {action.value}` needs a document id: "
                f"pfi-rag docs --client {client} {action.value} DOC"
            )
        _check_client(client)
        if action is DocsAction.list:  # read-only: no lock, no model, works beside a server
            from pfi_rag.retriever.reading import current_documents

            _print_list(current_documents(cfg.data_root, client), json_out)
            return
        if action is DocsAction.show:
            from pfi_rag.retriever.reading import document_versions

            versions = document_versions(cfg.data_root, client, doc_id)
            if not versions:
                fail(
                    f"client {client!r} has no document {doc_id!r}; see `pfi-rag docs --client {client} list`"
                )
            _print_versions(versions, json_out)
            return
        with _open_store(cfg, client, DOCUMENTS_ROUTE) as store:
            if not store.delete(doc_id):
                fail(
                    f"client {client!r} has no document {doc_id!r}; see `pfi-rag docs --client {client} list`"
                )
            elif json_out:
                print_json({"deleted": doc_id})
            else:
                console.print(f"{client}: deleted {doc_id} (every version, from the index and the store)")


def _print_list(documents, json_out: bool) -> None:
    if json_out:
        print_json([{k: v for k, v in d.__dict__.items() if k not in ("text", "chunks")} for d in documents])
        return
    table = Table(title=f"{len(documents)} documents")
    for column in ("document", "v", "added", "source", "text"):
        table.add_column(column)
    for d in documents:
        preview = d.text if len(d.text) <= 60 else d.text[:57] + "..."
        table.add_row(d.doc_id, str(d.version), d.added_at[:19], d.source, preview.replace("\n", " "))
    console.print(table)


def _print_versions(versions, json_out: bool) -> None:
    if json_out:
        print_json([v.__dict__ for v in versions])
        return
    for v in versions:
        state = f"superseded {v.superseded_at}" if v.superseded_at else "current"
        console.print(f"[bold]{v.doc_id}[/] v{v.version} ({state}; added {v.added_at}; source {v.source})")
        console.print(f"  metadata: {json.dumps(v.metadata, sort_keys=True)}", highlight=False)
        console.print(v.text, highlight=False, markup=False)
