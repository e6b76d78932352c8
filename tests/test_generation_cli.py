"""`pfi-rag generate` end to end: the client's index (real embedder, FAISS), adapter, tiny generator."""

from __future__ import annotations

import copy
import json

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.config import AdapterConfig
from pfi_rag.data.synth import synthesize
from pfi_rag.models.adapters import client_adapter_dir, save_adapter
from pfi_rag.models.lora import attach_lora


@pytest.fixture()
def workdir(cli_workdir, monkeypatch):
    monkeypatch.setenv("PFI_RAG_MODELS__GENERATOR", "tiny-random")
    monkeypatch.setenv("PFI_RAG_MODELS__THREADS", "1")
    monkeypatch.setenv("PFI_RAG_SERVING__MAX_NEW_TOKENS", "8")
    synthesize(cli_workdir / "pfi-data", clients=2, seed=0)
    return cli_workdir


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_generate_answers_with_passages_and_says_which_adapter(workdir, tiny_generator):
    documents = "pfi-data/clients/client-00/data/documents.jsonl"
    assert run("ingest", "--client", "client-00", documents).exit_code == 0
    save_adapter(
        attach_lora(copy.deepcopy(tiny_generator[0]), AdapterConfig()),
        client_adapter_dir("pfi-data", "client-00"),
        round=2,
    )

    answered = run("generate", "--client", "client-00", "Which city do I live in?", "--k", "3", "--json")
    table = run("generate", "--client", "client-00", "Which city do I live in?")
    no_index = run("generate", "--client", "client-01", "Where do I live?")

    assert answered.exit_code == 0, answered.output
    result = json.loads(answered.stdout)
    # Of the 3 retrieved, only the note that answers is over the relevance floor (cosine 0.34 vs < 0.2).
    assert [(p["number"], p["doc_id"]) for p in result["passages"]] == [(1, "client-00-doc-home")]
    assert result["passages_below_floor"] == 2 and "below the relevance floor" in result["retrieval"]
    assert result["adapter"] == {"client": "client-00", "kind": "client", "version": 1, "round": 2}
    assert 0 < result["completion_tokens"] <= 8
    assert table.exit_code == 0 and "Served by:" in table.stdout and "client-00-doc" in table.stdout
    assert (
        no_index.exit_code == 0 and "base model" in no_index.stdout and "no document index" in no_index.output
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--client", "../x", "hi"], "client_id"),
        (["--client", "a", "hi", "--top-p", "0"], "top_p"),
        (["--client", "a", "hi", "--max-new-tokens", "9"], "serving.max_new_tokens"),
        (["--client", "a", "why " * 2000], "serving.max_prompt_tokens"),
    ],
)
def test_generate_refuses_bad_input_with_exit_2(workdir, args, message):
    result = run("generate", *args)
    assert result.exit_code == 2, result.output
    assert message in result.output
