"""A client's own documents as its training data: the store, the held-out split, windows of long
documents, who federates, and real text nobody here wrote (chatterbot-corpus) end to end."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfi_rag import layout
from pfi_rag.cli import app
from pfi_rag.config import RetrievalConfig, load_config
from pfi_rag.data.corpus import (
    CorpusError,
    is_held_out,
    load_corpus,
    require_training_data,
    too_little_data,
    warn_locally,
)
from pfi_rag.data.records import Document, Instruction
from pfi_rag.data.synth import ingest_synthetic, synthesize
from pfi_rag.federation.checkpoint import load_checkpoint
from pfi_rag.federation.launcher import plan_participants
from pfi_rag.federation.task import SatOut, train_round
from pfi_rag.privacy import PrivacyLedger
from pfi_rag.privacy.dataset import build_examples, document_windows
from pfi_rag.retriever import ClientStore
from tests.federation_support import cli_options, tiny_federation_settings
from tests.realtext import write_topic, write_topics


def _store(root: Path, client: str, embedder, docs: list[Document]) -> None:
    with ClientStore.open(root, client, RetrievalConfig(), embedder) as store:
        store.add_documents(docs)


def test_corpus_is_the_stores_current_documents_split_the_same_way_every_time(tmp_path, embedder, caplog):
    docs = [Document(id=f"note-{i:02d}", text=f"Note {i}: the shed key is under pot {i}.") for i in range(40)]
    docs.append(Document(id="pinned-out", text="Kept for evaluation.", metadata={"split": "held_out"}))
    docs.append(Document(id="pinned-in", text="Always trained on.", metadata={"split": "train"}))
    _store(tmp_path, "alice", embedder, docs)
    with ClientStore.open(tmp_path, "alice", RetrievalConfig(), embedder) as store:
        store.add_documents([Document(id="note-03", text="Note 3, changed: the key moved to the porch.")])
        assert store.delete("note-07")

    first = load_corpus(tmp_path, "alice", held_out_share=0.25)
    again = load_corpus(tmp_path, "alice", held_out_share=0.5)  # the recorded share wins

    ids = {d.id for d in first.train} | {d.id for d in first.held_out}
    assert len(ids) == 41 and "note-07" not in ids  # deleted: gone
    texts = {d.id: d.text for d in first.train + first.held_out}
    assert texts["note-03"].startswith("Note 3, changed")  # current version only
    assert not {d.id for d in first.train} & {d.id for d in first.held_out}
    assert "pinned-out" in {d.id for d in first.held_out} and "pinned-in" in {d.id for d in first.train}
    assert [d.id for d in again.held_out] == [d.id for d in first.held_out] and again.held_out_share == 0.25
    assert "fixed at held-out share 0.25" in caplog.text
    assert 2 <= len(first.held_out) <= 20 and first.source == "store"
    # The split is the salted hash of the id, recorded with the share beside the client's store.
    recorded = json.loads(layout.client_split_file(tmp_path, "alice").read_text())
    assert recorded["held_out_share"] == 0.25 and len(recorded["salt"]) == 32
    for doc in first.held_out:
        assert is_held_out(doc, recorded["salt"], 0.25)


def test_a_store_less_synthetic_root_falls_back_to_its_files_until_it_has_a_store(tmp_path, embedder):
    synthesize(tmp_path, clients=1, seed=0)
    before = load_corpus(tmp_path, "client-00")
    assert before.source.endswith("documents.jsonl") and before.instructions
    # Planted items (facts, canaries) are pinned to training: the manifest assumes they were learned.
    assert all("-canary-" not in d.id and "-doc-" not in d.id for d in before.held_out)
    ingest_synthetic(tmp_path, ["client-00"], RetrievalConfig(), embedder)
    after = load_corpus(tmp_path, "client-00")
    assert after.source == "store"
    assert [d.id for d in after.train] == [d.id for d in before.train]


def test_a_long_document_is_one_record_whose_windows_cover_all_its_text(tiny_generator):
    _, tokenizer, _ = tiny_generator
    long = Document(id="long", text=" ".join(f"word{i} is number {i}." for i in range(120)))
    windows = document_windows(tokenizer, long, max_len=64)
    ids = [tokenizer.bos_token_id, *tokenizer(long.text, add_special_tokens=False)["input_ids"]]
    ids.append(tokenizer.eos_token_id)
    assert len(ids) > 3 * 64 and len(windows) == -(-(len(ids) - 1) // 63)
    assert all(len(w.input_ids) <= 64 for w in windows)
    # Neighbours share one token, so every next-token pair is a target in exactly one window.
    joined = windows[0].input_ids.tolist() + [t for w in windows[1:] for t in w.input_ids.tolist()[1:]]
    assert joined == ids

    dataset = build_examples(
        tokenizer, [long], [Instruction(prompt="Q?", response="A.")], max_len=64, seed=3
    )
    assert len(dataset) == 2 and dataset.windows == len(windows) + 1  # records, not windows
    drawn = {tuple(dataset[0].input_ids.tolist()) for _ in range(200)}
    assert drawn == {tuple(w.input_ids.tolist()) for w in windows}  # every window gets trained on
    assert [e.input_ids.tolist() for e in dataset[0:2]] == [e.input_ids.tolist() for e in dataset[0:2]]
    replay = build_examples(tokenizer, [long], [], max_len=64, seed=3)
    assert dataset[0:1][0].input_ids.tolist() == replay[0:1][0].input_ids.tolist()


def test_too_little_data_is_named_with_what_to_change(tmp_path, embedder):
    _store(tmp_path, "tiny", embedder, [Document(id=f"d{i}", text=f"Entry {i}.") for i in range(3)])
    corpus = load_corpus(tmp_path, "tiny", held_out_share=0.0)
    message = too_little_data(corpus, batch_size=8)
    assert "3 training records" in message and "privacy.batch_size = 8" in message
    assert "pfi-rag ingest --client tiny" in message and too_little_data(corpus, batch_size=3) is None
    warn_locally(tmp_path, "tiny", message)  # what a federated round does with it
    assert message in (tmp_path / "clients" / "tiny" / "logs" / "federation.log").read_text()
    (tmp_path / "clients" / "empty").mkdir()
    with pytest.raises(CorpusError, match="ingest --client empty"):
        require_training_data(load_corpus(tmp_path, "empty"))
    with pytest.raises(CorpusError, match="no training data"):
        load_corpus(tmp_path, "nobody")


def test_federate_takes_every_client_with_data_and_says_why_it_leaves_others_out(tmp_path, embedder):
    for name in ("ana", "ben", "cy"):
        docs = [Document(id=f"{name}-{i}", text=f"{name} note {i}.") for i in range(6)]
        _store(tmp_path, name, embedder, docs)
    (tmp_path / "clients" / "dee").mkdir()
    cfg = load_config(overrides={"data_root": str(tmp_path)})

    clients, left_out = plan_participants(cfg)
    assert clients == ["ana", "ben", "cy"] and list(left_out) == ["dee"]
    assert "no documents" in left_out["dee"]

    cfg.federation.clients = 2
    clients, left_out = plan_participants(cfg)
    assert clients == ["ana", "ben"] and "federation.clients = 2" in left_out["cy"]


@pytest.mark.slow
def test_real_text_clients_ingest_train_federate_and_forget_a_deleted_document(
    tmp_path, model_cache, embedder, tiny_generator
):
    """chatterbot-corpus topics as three clients, from .txt files to a federated round; then a
    document deleted from a client's store is absent from its next round's training."""
    root = tmp_path / "data"
    directories = write_topics(tmp_path / "txt", ("coding", "emotion", "psychology"))
    sets = tiny_federation_settings(model_cache, **{"privacy.max_seq_len": 64, "federation.rounds": 1})
    options = cli_options(root, sets)
    runner = CliRunner()
    for client, directory in directories.items():
        result = runner.invoke(app, [*options, "ingest", "--client", client, f"{directory}/"])
        assert result.exit_code == 0, result.output

    trained = runner.invoke(app, [*options, "train", "--client", "coding", "--steps", "2", "--json"])
    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    coding = load_corpus(root, "coding")
    assert result["documents"] == len(coding.train)
    assert result["held_out_documents"] == len(coding.held_out) > 0
    assert result["records"] == len(coding.train)  # no instructions: the documents are the data
    _, tokenizer, _ = tiny_generator
    assert any(len(document_windows(tokenizer, d, 64)) > 1 for d in coding.train)  # long ones windowed

    federated = runner.invoke(app, [*options, "federate", "--rounds", "1", "--json"])
    assert federated.exit_code == 0, federated.output
    summary = json.loads(federated.stdout[federated.stdout.index("{") :])
    assert sorted(summary["clients"]) == ["coding", "emotion", "psychology"]
    assert summary["rounds"][0]["results"] == 3

    cfg = load_config(overrides={"data_root": str(root), **sets})
    emotion = load_corpus(root, "emotion")
    gone = emotion.train[0].id
    with ClientStore.open(root, "emotion", cfg.retrieval, embedder) as store:
        assert store.delete(gone)
    # Round 2 of this client, as its ClientApp runs it (the Flower run itself is tested above).
    outcome = train_round(cfg, "emotion", load_checkpoint(root).arrays, server_round=2)
    assert not isinstance(outcome, SatOut)
    ledger = PrivacyLedger.open(root, "emotion", cfg.privacy)
    trainings = [s for s in ledger.spends if s.kind == "dp-sgd"]
    assert [s.records for s in trainings] == [len(emotion.train), len(emotion.train) - 1]
    assert gone not in {d.id for d in load_corpus(root, "emotion").train}


def test_realtext_helper_writes_topics_as_txt_files(tmp_path):
    directory = write_topic("emotion", tmp_path / "emotion", per_file=4)
    files = sorted(directory.glob("*.txt"))
    assert len(files) == 12 and all(f.read_text().strip() for f in files)
