"""`pfi-rag ingest|search|docs` end to end on the synthetic data (real embedder, real FAISS)."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.data.synth import synthesize


@pytest.fixture()
def workdir(cli_workdir):
    synthesize(cli_workdir / "pfi-data", clients=1, seed=0)
    return cli_workdir


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_ingest_search_and_docs_on_synthetic_data(workdir):
    documents = "pfi-data/clients/client-00/data/documents.jsonl"
    updates = "pfi-data/clients/client-00/data/updates.jsonl"

    ingested = run("ingest", "--client", "client-00", documents, "--json")
    updated = run("ingest", "--client", "client-00", updates, "--json")
    found = run("search", "--client", "client-00", "Where do I live?", "-k", "5", "--json")
    table = run("search", "--client", "client-00", "Where do I live?", "-k", "2")
    shown = run("docs", "--client", "client-00", "show", "client-00-doc-home", "--json")
    deleted = run("docs", "--client", "client-00", "delete", "client-00-doc-home")

    assert ingested.exit_code == 0, ingested.output
    report = json.loads(ingested.stdout)["report"]
    assert report["added"] == json.loads(ingested.stdout)["stats"]["documents"] > 0
    assert json.loads(updated.stdout)["report"]["superseded"] == 1
    hits = json.loads(found.stdout)
    assert len(hits) == 5 and hits[0]["doc_id"] == "client-00-doc-home" and hits[0]["version"] == 2
    assert table.exit_code == 0 and "client-00-doc-home" in table.stdout
    assert [v["version"] for v in json.loads(shown.stdout)] == [1, 2]
    assert deleted.exit_code == 0 and "deleted client-00-doc-home" in deleted.stdout


@pytest.mark.parametrize(
    "args, message",
    [
        (["ingest", "--client", "../etc", "x.txt"], "invalid client id"),
        (["ingest", "--client", "client-00", "missing.txt"], "no such file"),
        (["ingest", "--client", "client-00"], "give files"),
        (["search", "--client", "/abs", "q"], "invalid client id"),
        (["search", "--client", "client-00", "q", "--where", "novalue"], "key=value"),
        (["docs", "--client", "client-00", "show"], "needs a document id"),
    ],
)
def test_bad_input_exits_2_with_one_line(workdir, args, message):
    result = run(*args)

    assert result.exit_code == 2
    assert message in result.stderr and len(result.stderr.strip().splitlines()) == 1
    assert not (workdir / "pfi-data" / "clients" / "client-00" / "index").exists()
