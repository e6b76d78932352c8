"""Probes on a user's own documents, without planted ground truth: shipped evaluation sets, cloze
items from held-out documents, stale retrieval from the store's history, and skips that say what to
run. Stores are real (ClientStore: chunking, the default embedder, FAISS, SQLite)."""

from __future__ import annotations

from pathlib import Path

import pytest

from pfi_rag.config import Config, RetrievalConfig
from pfi_rag.data.records import Document, EvalText, RefusalPrompt, write_jsonl
from pfi_rag.probes import ProbeContext, run_suite
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.items import cloze_items
from pfi_rag.probes.metrics import ece_equal_mass
from pfi_rag.probes.stale import StaleProbe, superseded_statements
from pfi_rag.retriever import ClientStore
from tests.realtext import write_topic

NOTES = [
    Document(id="garden", text="The garden shed key hangs on the blue hook behind the kitchen door."),
    Document(id="car", text="The car needs new winter tyres before the trip to the mountains in December."),
    Document(id="dentist", text="My dentist appointment moved to Thursday morning at the clinic."),
]


def _store(root: Path, client: str, embedder, docs: list[Document]) -> None:
    with ClientStore.open(root, client, RetrievalConfig(), embedder) as store:
        store.add_documents(docs)


def test_equal_mass_ece_by_hand():
    # Sorted confidences .2 .4 | .6 .8 in two bins of two; correct 0 1 | 1 1.
    # Bin 1: |0.5 - 0.3| = 0.2; bin 2: |1.0 - 0.7| = 0.3; each holds half: 0.25.
    assert ece_equal_mass([0.8, 0.2, 0.6, 0.4], [1, 0, 1, 1], bins=2) == pytest.approx(0.25)
    assert ece_equal_mass([0.9, 0.9], [1, 1], bins=10) == pytest.approx(0.1)  # fewer items than bins


def test_shipped_evaluation_sets_serve_any_data_root_and_yield_to_its_own(tmp_path):
    ctx = ProbeContext(Config(data_root=tmp_path))
    texts, prompts = ctx.shared_eval()
    assert len(texts) == 40 and len(prompts) == 16 and len({p.category for p in prompts}) >= 10
    pairs = ctx.counterfactuals("anyone")
    assert len(pairs) == 48 and {p.attribute for p in pairs} >= {"gender", "age", "religion", "origin"}
    assert all(p.prompt_a != p.prompt_b and p.group_a in p.prompt_a for p in pairs)

    write_jsonl(tmp_path / "shared" / "general_eval.jsonl", [EvalText(text="Own text.")])
    write_jsonl(tmp_path / "shared" / "refusal_prompts.jsonl", [RefusalPrompt(prompt="Own.", category="x")])
    assert [len(s) for s in ProbeContext(Config(data_root=tmp_path)).shared_eval()] == [1, 1]


def test_cloze_items_mask_a_content_word_of_a_held_out_document():
    held_out = [NOTES[0]]
    items = cloze_items(held_out, NOTES, count=3, choices=4, seed=0)

    assert len(items) == 3 and all(i.kind == "cloze" and i.doc_id == "garden" for i in items)
    text = NOTES[0].text
    for item in items:
        word = item.answer.strip()
        # The prompt is the document up to the word; the answer continues it.
        assert text.startswith(item.prompt) and text[len(item.prompt) :].lstrip().startswith(word)
        assert len(item.prompt.split()) >= 4 and len(word) >= 4
        assert len(item.options) == 4 and item.options[item.label] == item.answer
        vocabulary = " ".join(d.text for d in NOTES)
        distractors = [o for o in item.options if o != item.answer]
        assert len(distractors) == 3 and all(o.strip() in vocabulary for o in distractors)
        assert "___" in item.query and word not in item.query.split()
    assert items == cloze_items(held_out, NOTES, count=3, choices=4, seed=0)  # deterministic
    assert cloze_items(held_out, NOTES, count=100, choices=4, seed=0)[-1].answer == " door"  # every position


def test_superseded_statements_are_sentences_the_current_version_replaced():
    old = "Hello there. The key is under the blue pot now."
    new = "Hello there. The key moved to the porch drawer."
    versions = [
        {"doc_id": "a", "version": 1, "text": old, "current": False},
        {"doc_id": "a", "version": 2, "text": new, "current": True},
    ]
    statements = superseded_statements(versions, ["Hello there. The key moved to the porch drawer."])
    assert [(s["old"], s["query"]) for s in statements] == [
        ("The key is under the blue pot now.", "The key moved to the porch drawer.")
    ]
    # A sentence another current document still states is not superseded text.
    current = ["Hello there. The key moved to the porch drawer.", "Note: the key is under the blue pot now."]
    assert superseded_statements(versions, current) == []


def test_stale_probe_reads_the_store_history_and_flags_a_retriever_that_serves_the_old_version(
    tmp_path, embedder
):
    # Prepare: the client updates its dentist note; a serving copy of its index taken before the
    # update (another data root holding only the old version) is a retriever that never heard of it.
    root, copy_root = tmp_path / "root", tmp_path / "copy"
    _store(root, "alice", embedder, NOTES)
    _store(copy_root, "alice", embedder, NOTES)
    moved = "My dentist appointment is now on Friday afternoon at the hospital in the old town."
    _store(root, "alice", embedder, [Document(id="dentist", text=moved)])

    def run(retriever_root: Path):
        stores = []

        def factory(client: str):
            stores.append(ClientStore.open(retriever_root, client, RetrievalConfig(), embedder))
            return stores[-1]

        try:
            ctx = ProbeContext(Config(data_root=root), retriever_factory=factory)
            return StaleProbe().run_client(ctx, "alice")
        finally:
            for store in stores:
                store.close()

    # Execute
    healthy, stale = run(root), run(copy_root)

    # Assert
    assert healthy.verdict == Verdict.PASS and healthy.value == 0.0
    assert healthy.evidence["source"] == "store history" and healthy.evidence["statements"] == 1
    assert stale.verdict == Verdict.FAIL and stale.value == 1.0
    assert stale.evidence["stale"][0]["doc_id"] == "dentist"
    assert stale.evidence["stale"][0]["superseded"].startswith("My dentist appointment moved to Thursday")


def test_on_a_client_with_only_documents_every_skip_says_what_to_run(
    tmp_path, embedder, tiny_models_config, tiny_generator
):
    directory = write_topic("emotion", tmp_path / "txt", per_file=2)
    with ClientStore.open(tmp_path, "alice", RetrievalConfig(), embedder) as store:
        store.add_paths(sorted(directory.glob("*.txt")))
    model, tokenizer, _ = tiny_generator
    ctx = ProbeContext(
        Config(data_root=tmp_path, models=tiny_models_config), generator=(model, tokenizer), embedder=embedder
    )
    try:
        report = run_suite(ctx, suite="all")
    finally:
        ctx.close()

    assert report.clients == ["alice"]
    reasons = {s.probe: why for s in report.summaries for why in s.skipped.values()}
    assert set(reasons) >= {"bias", "calibration", "exposure", "audit", "membership", "erosion", "ood"}
    assert [why for why in reasons.values() if "`pfi-rag " not in why] == []
    assert not any(s.errors for s in report.summaries)
    ran = {s.probe: s for s in report.summaries if s.verdict in (Verdict.PASS, Verdict.FAIL)}
    # What needs no adapter runs on the documents alone: retrieval of cloze items' sources, staleness.
    assert 0 < ran["retrieval_hit"].value <= 1 and ran["stale"].value == 0.0
