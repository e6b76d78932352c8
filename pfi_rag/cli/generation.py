"""`pfi-rag generate`: one personalized, retrieval-grounded answer."""

from __future__ import annotations

import dataclasses
import re
from typing import Any

import typer
from rich.table import Table

from pfi_rag.cli.common import config_from, console, err_console, fail, print_json
from pfi_rag.config import Config

GENERATE_ROUTE = (
    "curl -s {base}/v1/generate -H \"Authorization: Bearer $KEY\" -H 'Content-Type: application/json' "
    "-d '{\"client_id\": \"{client}\", \"prompt\": \"...\"}'"
)


def _retrieve(cfg: Config, client: str, question: str, k: int) -> tuple[list[Any], str]:
    """The client's top-k passages and a note on where they came from (or why there are none)."""
    from pfi_rag.layout import client_index_dir

    if not client_index_dir(cfg.data_root, client).is_dir():
        return [], f"client {client!r} has no document index (add documents with `pfi-rag ingest`)"
    try:
        from pfi_rag.retriever import ClientStore, RetrieverError, StoreBusy
    except ImportError:
        return [], "retrieval is unavailable in this installation (pfi_rag.retriever is missing)"
    from pfi_rag.cli.retrieval import busy_message, fail_if_busy
    from pfi_rag.models.loading import load_embedder

    fail_if_busy(cfg, client, GENERATE_ROUTE)  # before loading any model
    try:
        with ClientStore.open(cfg.data_root, client, cfg.retrieval, load_embedder(cfg.models)) as store:
            hits = store.search(question, k)
    except StoreBusy:
        fail(busy_message(cfg, client, GENERATE_ROUTE))
    except RetrieverError as exc:
        fail(str(exc))
    return hits, f"{len(hits)} passages from the client's index"


def _print_answer(result, note: str) -> None:
    adapter = result.adapter
    served = {
        "client": f"the client's own adapter (version {adapter.version}, round {adapter.round})",
        "global": f"the federation's global adapter (version {adapter.version}, round {adapter.round})",
        "base": "the base model (no client or global adapter on disk)",
    }[adapter.kind]
    console.print(f"[bold]Answer:[/] {result.text.strip()}")
    console.print(f"[bold]Served by:[/] {served}")
    cited = {int(n) for n in re.findall(r"\[(\d+)\]", result.text)}
    if result.passages:
        table = Table("n", "cited", "doc", "score", "passage", title=note)
        for p in result.passages:
            snippet = p.text if len(p.text) <= 100 else p.text[:97] + "..."
            table.add_row(
                str(p.number), "yes" if p.number in cited else "", p.doc_id, f"{p.score:.3f}", snippet
            )
        console.print(table)
    else:
        console.print(f"[bold]Passages:[/] none ({note})")
    console.print(
        f"[dim]{result.prompt_tokens} prompt + {result.completion_tokens} generated tokens, "
        f"finished by {result.finish_reason}[/]"
    )


def register(app: typer.Typer) -> None:
    @app.command("generate")
    def generate(
        ctx: typer.Context,
        question: str = typer.Argument(..., help="The question to answer."),
        client: str = typer.Option(..., "--client", help="Client id: whose adapter and documents to use."),
        k: int = typer.Option(None, "--k", min=0, help="Passages to retrieve (default retrieval.top_k)."),
        max_new_tokens: int = typer.Option(None, "--max-new-tokens", help="Default serving.max_new_tokens."),
        temperature: float = typer.Option(0.0, "--temperature", help="0 is greedy."),
        top_p: float = typer.Option(1.0, "--top-p"),
        top_k: int = typer.Option(0, "--top-k", help="0 disables the top-k cut."),
        seed: int = typer.Option(None, "--seed", help="Makes sampling reproducible."),
        stop: list[str] = typer.Option([], "--stop", help="Stop before this text (repeatable)."),
        json_out: bool = typer.Option(False, "--json", help="Print the result as JSON."),
    ) -> None:
        """Answer a question as a client: its adapter, its retrieved documents."""
        from pfi_rag.models import AdapterLoadError, Engine, GenerationRequest, InvalidRequest, PromptTooLong

        cfg = config_from(ctx)
        try:
            request = GenerationRequest(
                client_id=client,
                question=question,
                max_new_tokens=max_new_tokens,
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop=stop,
            )
        except InvalidRequest as exc:
            fail(str(exc))
        limit = cfg.serving.max_new_tokens
        if max_new_tokens is not None and max_new_tokens > limit:
            fail(f"--max-new-tokens {max_new_tokens} is over serving.max_new_tokens ({limit})")
        hits, note = _retrieve(cfg, client, question, cfg.retrieval.top_k if k is None else k)
        if not hits and not json_out:
            err_console.print(f"note: {note}")
        err_console.print(f"loading the generator ({cfg.models.generator})", highlight=False)
        engine = Engine.from_config(cfg)
        try:
            result = engine.generate(dataclasses.replace(request, passages=hits))
        except (InvalidRequest, PromptTooLong, AdapterLoadError) as exc:
            fail(str(exc))
        if result.passages_below_floor:
            note += (
                f"; {result.passages_below_floor} below the relevance floor "
                f"({cfg.retrieval.relevance_floor}) left out of the prompt"
            )
        if json_out:
            print_json({**result.as_dict(), "retrieval": note})
        else:
            _print_answer(result, note)
