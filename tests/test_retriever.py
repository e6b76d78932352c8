"""The per-client retriever on real FAISS, SQLite and the default embedder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from pfi_rag.config import RetrievalConfig
from pfi_rag.data.records import Document, load_client_data
from pfi_rag.data.synth import client_ids, synthesize
from pfi_rag.layout import InvalidClientId
from pfi_rag.retriever import ClientStore, RetrieverError, StoreBusy
from pfi_rag.retriever import index as vindex
from pfi_rag.retriever.chunking import chunk_text


@pytest.fixture(scope="module")
def synth_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    synthesize(root, clients=8, seed=0)
    return root


def open_store(root: Path, embedder, client: str = "alice", **cfg) -> ClientStore:
    return ClientStore.open(root, client, RetrievalConfig(**cfg), embedder)


def agree(store: ClientStore) -> bool:
    """Index and docstore hold the same live chunks (the crash-safety invariant)."""
    held = set(vindex.ids_of(store._index).tolist())
    live = set(store._docstore.live_ids().tolist())
    return held == live and store._index.ntotal == store.stats()["chunks"]


def test_answer_document_in_top5_for_90_percent_of_questions(synth_root, tmp_path, embedder):
    found, asked = 0, 0
    for client in client_ids(8):
        data = load_client_data(synth_root, client)
        with ClientStore.open(tmp_path, client, RetrievalConfig(), embedder) as store:
            store.add_documents(data.documents)
            results = store.search_many([qa.question for qa in data.qa], 5)
        for qa, hits in zip(data.qa, results, strict=True):
            asked += 1
            found += qa.doc_id in {hit.doc_id for hit in hits}
    rate = found / asked
    print(f"top-5 hit rate: {found}/{asked} = {rate:.3f}")
    assert rate >= 0.9


def test_newer_version_supersedes_the_old_one(synth_root, tmp_path, embedder):
    data = load_client_data(synth_root, "client-00")
    update = data.updates[0]
    with open_store(tmp_path, embedder, "client-00") as store:
        store.add_documents(data.documents)
        old = store.get_document(update.id)

        report = store.add_documents(data.updates, source="updates.jsonl")
        hits = store.search("Which city do I live in now?", 50)

        assert (report.added, report.superseded, report.unchanged) == (0, 1, 0)
        for_doc = [hit for hit in hits if hit.doc_id == update.id]
        assert for_doc and all(hit.version == 2 and hit.text in update.text for hit in for_doc)
        assert all(old.text not in hit.text for hit in hits)
        history = store.history(update.id)
        assert [v.version for v in history] == [1, 2]
        assert history[0].text == old.text and history[0].superseded_at is not None
        assert history[1].superseded_at is None and history[1].added_at >= history[0].added_at
        assert store.stats()["superseded_versions"] == 1 and agree(store)


def test_readding_identical_content_is_a_no_op(tmp_path, embedder):
    docs = [Document(id=f"d{i}", text=f"Note {i}: the cat sat on mat number {i}.") for i in range(5)]
    with open_store(tmp_path, embedder) as store:
        store.add_documents(docs)
        before = store.stats()

        report = store.add_documents(docs)

        assert (report.added, report.unchanged, report.superseded, report.chunks) == (0, 5, 0, 0)
        assert store.stats()["chunks"] == before["chunks"] and store.history("d0")[-1].version == 1


def test_a_document_the_tokenizer_finds_nothing_in_is_kept_without_chunks(tmp_path, embedder):
    """Control characters alone give no token, so no chunk (found by the API fuzz test: a batch
    of such documents failed with a 500)."""
    with open_store(tmp_path, embedder) as store:
        report = store.add_documents([Document(id="blank", text="\x00\x01")])

        assert (report.added, report.chunks) == (1, 0)
        assert store.get_document("blank").text == "\x00\x01" and store.search("anything", 5) == []
        store.add_documents([Document(id="real", text="My bank PIN is 123456.")])
        assert [hit.doc_id for hit in store.search("bank PIN", 5)] == ["real"] and agree(store)


def test_delete_removes_a_document_from_index_and_store(tmp_path, embedder):
    docs = [
        Document(id="keep", text="My dentist appointment is on Tuesday."),
        Document(id="gone", text="My bank PIN is 123456."),
    ]
    with open_store(tmp_path, embedder) as store:
        store.add_documents(docs)
        store.add_documents([Document(id="gone", text="My bank PIN is now 654321.")])

        assert store.delete("gone") is True
        assert store.delete("gone") is False

        assert [hit.doc_id for hit in store.search("bank PIN", 5)] == ["keep"]
        assert store.get_document("gone") is None and store.history("gone") == []
        assert store.stats()["documents"] == 1 and agree(store)


def test_search_ranks_and_filters_by_metadata(tmp_path, embedder):
    docs = [
        Document(id="e1", text="Flight to Lisbon leaves at 9am.", metadata={"kind": "email", "year": 2025}),
        Document(id="n1", text="Flight to Oslo was cancelled.", metadata={"kind": "note", "year": 2024}),
        Document(id="n2", text="Bake bread with rye flour.", metadata={"kind": "note", "year": 2025}),
    ]
    with open_store(tmp_path, embedder) as store:
        store.add_documents(docs)

        ranked = store.search("flight departure time", 3)
        notes = store.search("flight departure time", 3, where={"kind": "note"})
        recent_notes = store.search("flight", 3, where={"kind": ["note"], "year": 2025})

        assert [hit.doc_id for hit in ranked][:2] in (["e1", "n1"], ["n1", "e1"])
        assert ranked[0].score >= ranked[1].score >= ranked[2].score
        assert {hit.doc_id for hit in notes} == {"n1", "n2"}
        assert [hit.doc_id for hit in recent_notes] == ["n2"]
        assert recent_notes[0].metadata == {"kind": "note", "year": 2025}
        with pytest.raises(RetrieverError, match="filter"):
            store.search("x", 3, where={"kind": {"nested": 1}})


def test_long_documents_are_chunked_within_the_token_limit_with_overlap(tmp_path, embedder):
    words = [f"word{i}" for i in range(600)]
    text = " ".join(words)
    with open_store(tmp_path, embedder, chunk_tokens=64, chunk_overlap=16) as store:
        store.add_documents([Document(id="long", text=text, metadata={"kind": "essay"})])
        chunks = store.get_document("long").chunks

        hit = store.search("word300 word301", 1)[0]

    tokenizer = embedder.tokenizer
    assert len(chunks) > 1
    for chunk in chunks:
        assert len(tokenizer(chunk, add_special_tokens=False)["input_ids"]) <= 64
        assert chunk in text and not chunk.startswith("#")
    covered = set(" ".join(chunks).split())
    assert covered == set(words)  # nothing lost
    assert chunks[0].split()[-1] in chunks[1]  # consecutive chunks overlap
    assert hit.doc_id == "long" and hit.metadata == {"kind": "essay"} and hit.position >= 1


def test_chunk_offsets_slice_the_original_text(embedder):
    text = "Héllo   wörld,\nthis is\ta test of unbelievably long words."

    chunks = chunk_text(text, embedder.tokenizer, size=5, overlap=2)

    assert [c.position for c in chunks] == list(range(len(chunks)))
    assert all(text[c.start : c.end] == c.text for c in chunks)
    assert chunks[0].start == 0 and chunks[-1].end == len(text.rstrip())


def test_reopen_reconciles_a_stale_index_file(tmp_path, embedder):
    docs = [Document(id=f"d{i}", text=f"Fact {i}: item {i} is kept in box {i}.") for i in range(6)]
    with open_store(tmp_path, embedder) as store:
        store.add_documents(docs)
        index_file = store.directory / "faiss.index"
        shutil.copy(index_file, tmp_path / "old.index")
        store.delete("d0")
        store.add_documents([Document(id="d9", text="Fact 9: a new item.")])
    # As if the process died after the docstore commits but before the index file was rewritten.
    shutil.copy(tmp_path / "old.index", index_file)

    with open_store(tmp_path, embedder) as store:
        assert agree(store)
        assert store.stats()["chunks"] == 6
        assert "d0" not in {hit.doc_id for hit in store.search("item 0 box 0", 6)}
        assert store.search("a new item", 1)[0].doc_id == "d9"
    index_file.unlink()  # a missing index file is rebuilt from the docstore's vectors
    with open_store(tmp_path, embedder) as store:
        assert agree(store) and store._index.ntotal == 6


@pytest.mark.parametrize("kind", ["hnsw", "flat"])
def test_index_kinds_add_remove_and_search(tmp_path, embedder, kind):
    docs = [
        Document(id=f"d{i}", text=f"Item {i}: a {c} bicycle.") for i, c in enumerate(["red", "blue", "green"])
    ]
    with open_store(tmp_path, embedder, index=kind) as store:
        store.add_documents(docs)
        store.delete("d1")

        assert store.stats()["index"] == kind
        assert store.search("blue bicycle", 3)[0].doc_id != "d1" and agree(store)


def test_ivf_and_auto_switch_structures_as_a_client_grows():
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((vindex.IVF_MIN_TRAIN, 16)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    ids = np.arange(100, 100 + len(vectors), dtype=np.int64)
    cfg_ivf = RetrievalConfig(index="ivf", ivf_nprobe=64)
    cfg_auto = RetrievalConfig(index="auto", auto_ann_threshold=1000)

    small = vindex.fit(vindex.build(cfg_ivf, 16, "flat", vectors[:100], ids[:100]), cfg_ivf)
    ivf = vindex.fit(vindex.build(cfg_ivf, 16, "flat", vectors, ids), cfg_ivf)
    hnsw = vindex.fit(vindex.build(cfg_auto, 16, "flat", vectors, ids), cfg_auto)
    ivf = vindex.remove(ivf, cfg_ivf, ids[:10])
    hnsw = vindex.remove(hnsw, cfg_auto, ids[:10])

    assert vindex.kind_of(small) == "flat"
    assert (vindex.kind_of(ivf), vindex.kind_of(hnsw)) == ("ivf", "hnsw")
    for index in (ivf, hnsw):
        assert index.ntotal == len(vectors) - 10
        _, found = index.search(vectors[20:21], 1)
        assert found[0, 0] == ids[20]
        assert not set(ids[:10]) & set(vindex.ids_of(index).tolist())


@pytest.mark.parametrize("client", ["../escape", "/etc", "", "a" * 65, "Alice", "a/b", "-lead", "ok\n"])
def test_invalid_client_ids_are_refused_and_create_nothing(tmp_path, embedder, client):
    with pytest.raises(InvalidClientId):
        ClientStore.open(tmp_path, client, RetrievalConfig(), embedder)
    assert list(tmp_path.iterdir()) == []


def test_bad_files_and_documents_are_refused_and_change_nothing(tmp_path, embedder):
    good = tmp_path / "good.md"
    good.write_text("# Groceries\nBuy oat milk.\n", encoding="utf-8")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("café au lait".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n", encoding="utf-8")
    big = tmp_path / "big.txt"
    big.write_text("x" * 2000, encoding="utf-8")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": "a", "text": "fine"}\n{"text": "no id"}\n', encoding="utf-8")
    pdf = tmp_path / "scan.pdf"
    pdf.write_bytes(b"%PDF")
    cases = {
        latin1: "not UTF-8",
        empty: "empty",
        big: "max_file_bytes",
        broken: "broken.jsonl:2",
        pdf: "unsupported",
        tmp_path / "missing.txt": "no such file",
    }
    with open_store(tmp_path / "root", embedder, max_file_bytes=1000) as store:
        store.add_paths([good])
        before = (store.stats()["chunks"], [d.doc_id for d in store.list_documents()])

        for bad, message in cases.items():
            with pytest.raises(RetrieverError, match=message):
                store.add_paths([good, bad])  # a good file first: still nothing is written
        with pytest.raises(RetrieverError, match="empty"):
            store.add_documents([Document(id="new", text="fine"), Document(id="blank", text="")])

        assert (store.stats()["chunks"], [d.doc_id for d in store.list_documents()]) == before
        assert before[1] == ["good.md"] and agree(store)


def test_a_client_store_is_held_by_one_opener_at_a_time(tmp_path, embedder):
    with open_store(tmp_path, embedder):
        with pytest.raises(StoreBusy):
            open_store(tmp_path, embedder)
        other = open_store(tmp_path, embedder, client="bob")  # other clients are independent
        other.close()
    with open_store(tmp_path, embedder) as again:
        assert again.stats()["chunks"] == 0
