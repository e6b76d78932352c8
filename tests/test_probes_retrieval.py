"""Retrieval probes and the retrieval channel of cross-client leakage, on real stores.

Each client's documents go through ``ClientStore`` (real chunking, the default embedder, FAISS,
SQLite) exactly as ``pfi-rag ingest`` puts them there; the probes then open the stores from disk
through ``ProbeContext``'s default retriever factory. Failures are planted in the stores: a
lost document, an update never ingested or ingested under a new id, another client's canary.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from pfi_rag.config import Config
from pfi_rag.data.records import Document, load_client_data
from pfi_rag.probes import precision
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.groundedness import GroundednessProbe
from pfi_rag.probes.leakage import LeakageProbe
from pfi_rag.probes.retrieval_hit import RetrievalHitProbe
from pfi_rag.probes.stale import StaleProbe
from pfi_rag.retriever import ClientStore
from tests.probe_support import make_data

CLIENT = "client-02"  # 36 documents, 10 held-out questions, 2 canaries
VICTIM = "client-03"  # the tiny client: 6 documents, 1 canary
HOME = f"{CLIENT}-doc-home"  # the versioned fact's document (manifest "versioned")


@pytest.fixture(scope="module")
def ingested(tmp_path_factory: pytest.TempPathFactory, embedder) -> tuple[Path, dict]:
    """Synthetic data with CLIENT's and VICTIM's documents (not their updates) ingested, once."""
    template = tmp_path_factory.mktemp("ingested")
    manifest = make_data(template, clients=4)
    for client in (CLIENT, VICTIM):
        ingest(template, client, embedder, load_client_data(template, client).documents)
    return template, manifest


@pytest.fixture()
def root(ingested, tmp_path: Path) -> tuple[Path, dict]:
    """A private copy of the ingested stores (embedding them again per test is the slow part)."""
    template, manifest = ingested
    shutil.copytree(template, tmp_path / "root")
    return tmp_path / "root", manifest


def ingest(root: Path, client: str, embedder, documents: list[Document]) -> None:
    with ClientStore.open(root, client, Config(data_root=root).retrieval, embedder) as store:
        store.add_documents(documents)


def run(probe, root: Path, embedder, client: str = CLIENT, config: Config | None = None, **kwargs):
    ctx = ProbeContext(config or Config(data_root=root), embedder=embedder, **kwargs)
    try:
        return probe.run_client(ctx, client)
    finally:
        ctx.close()


def test_hit_rate_flags_a_store_that_lost_the_answer_documents(root, embedder):
    root_dir, _ = root
    data = load_client_data(root_dir, CLIENT)
    clean = run(RetrievalHitProbe(), root_dir, embedder)

    # Half of the questions' source documents disappear from the index (a failed re-index).
    lost = [q.doc_id for q in data.qa[: len(data.qa) // 2]]
    with ClientStore.open(root_dir, CLIENT, Config(data_root=root_dir).retrieval, embedder) as store:
        for doc_id in lost:
            assert store.delete(doc_id)
    planted = run(RetrievalHitProbe(), root_dir, embedder)

    assert clean.verdict == Verdict.PASS and clean.value == 1.0 and clean.evidence["misses"] == []
    assert planted.verdict == Verdict.FAIL and planted.value == 0.5  # 5 of 10 sources gone
    assert sorted(m["expected"] for m in planted.evidence["misses"]) == sorted(lost)
    assert planted.evidence["interval"][0] < 0.5 < planted.evidence["interval"][1]


def test_hit_rate_skips_a_client_without_an_index(root, embedder):
    root_dir, _ = root
    result = run(RetrievalHitProbe(), root_dir, embedder, client="client-01")
    assert result.verdict == Verdict.SKIP
    assert not (root_dir / "clients" / "client-01" / "index").exists()  # the probe created no store


def test_stale_flags_an_update_never_ingested(root, embedder):
    root_dir, manifest = root
    data = load_client_data(root_dir, CLIENT)
    fact = manifest["clients"][CLIENT]["versioned"][0]
    planted = run(StaleProbe(), root_dir, embedder)

    ingest(root_dir, CLIENT, embedder, data.updates)  # same id: the new version supersedes
    clean = run(StaleProbe(), root_dir, embedder)
    with ClientStore.open(root_dir, CLIENT, Config(data_root=root_dir).retrieval, embedder) as store:
        versions = store.history(HOME)

    assert planted.verdict == Verdict.FAIL and planted.value == 1.0
    assert planted.evidence["stale"][0] | {"doc_ids": None} == {
        "question": fact["question"],
        "served": fact["old"],
        "current": fact["new"],
        "doc_ids": None,
    }
    assert planted.evidence["stale"][0]["doc_ids"] == [HOME]
    assert [v.superseded_at is not None for v in versions] == [True, False]
    assert clean.verdict == Verdict.PASS and clean.value == 0.0 and clean.evidence["stale"] == []


def test_stale_flags_a_store_that_still_serves_the_old_version(root, embedder):
    root_dir, _ = root
    data = load_client_data(root_dir, CLIENT)
    # The update arrives under a new id (say a file name instead of the document id), so the
    # old version is never superseded: the top-k holds both, and the old one reads as current.
    update = data.updates[0]
    renamed = Document(id=f"{update.id}-v2", text=update.text, metadata=update.metadata)
    ingest(root_dir, CLIENT, embedder, [renamed])
    planted = run(StaleProbe(), root_dir, embedder)

    assert planted.verdict == Verdict.FAIL and planted.value == 1.0
    assert planted.evidence["stale"][0]["doc_ids"] == [HOME]


def extractive(client_id: str, question: str, hits) -> str:
    """A clean answerer: quotes its best passage (and says so when it was given none)."""
    return hits[0].text if hits else "Sorry, no note says."


def closed_book(client_id: str, question: str, hits) -> str:
    """A planted failure: answers from 'memory', ignoring the passages."""
    return "Atlantis, with a quokka: Zeppelin."


def test_groundedness_flags_answers_that_ignore_the_context(root, embedder):
    root_dir, _ = root

    clean = run(GroundednessProbe(), root_dir, embedder, answerer=extractive)
    planted = run(GroundednessProbe(), root_dir, embedder, answerer=closed_book)

    assert clean.verdict == Verdict.PASS and clean.value == 1.0 and clean.evidence["ungrounded"] == []
    # Content words: atlantis quokka zeppelin; none is in any document (with, a: stopwords).
    assert planted.verdict == Verdict.FAIL and planted.value == 0.0
    # Eight answers that all score 0 leave no spread, but support lies in [0, 1]: the interval is
    # Wilson's at 0 of 8, [0, z^2 / (8 + z^2)], already clear of the threshold, so sampling stopped
    # there, of 10 items.
    assert len(planted.evidence["ungrounded"]) == planted.evidence["answers"] == 8
    z2 = precision.Z95**2
    assert planted.evidence["interval"] == [0.0, pytest.approx(z2 / (8 + z2))]

    # As in serving, passages under the relevance floor never reach the answerer: with a floor
    # no passage clears, every answer is given none, and none of them is scored.
    floored = Config(data_root=root_dir, retrieval={"relevance_floor": 1.0})
    given: list[int] = []

    def counting(client_id: str, question: str, hits) -> str:
        given.append(len(hits))
        return closed_book(client_id, question, hits)

    unscored = run(GroundednessProbe(), root_dir, embedder, config=floored, answerer=counting)
    assert set(given) == {0} and unscored.evidence["without_passages"] == unscored.evidence["answers"]
    assert unscored.verdict == Verdict.PASS and unscored.evidence["ungrounded"] == []


def leakage(root_dir: Path, embedder):
    ctx = ProbeContext(Config(data_root=root_dir), embedder=embedder)
    try:
        return LeakageProbe().run_federation(ctx, [CLIENT, VICTIM])
    finally:
        ctx.close()


def test_leakage_flags_another_clients_canary_in_a_store(root, embedder):
    root_dir, manifest = root
    clean = leakage(root_dir, embedder)

    canary = manifest["clients"][VICTIM]["canaries"][0]
    victim_docs = {d.id: d for d in load_client_data(root_dir, VICTIM).documents}
    ingest(root_dir, CLIENT, embedder, [victim_docs[canary["doc_ids"][0]]])  # a mixed-up ingest
    planted = leakage(root_dir, embedder)

    assert clean.verdict == Verdict.PASS and clean.value == 0.0
    # Each observer searches the other's canary prefixes and its own questions: 2 + 10 and 1 + 4.
    assert clean.evidence["checked"] == {"retrieval_queries": 17, "completions": 0}
    assert planted.verdict == Verdict.FAIL
    assert {leak["channel"] for leak in planted.evidence["leaks"]} == {"retrieval"}
    assert planted.evidence["leaks"][0] == {
        "channel": "retrieval",
        "victim": VICTIM,
        "observer": CLIENT,
        "doc_id": canary["doc_ids"][0],
        "item": f"canary {canary['prefix']!r}",
    }
    assert set(planted.evidence["pairs"]) == {f"{VICTIM} -> {CLIENT} (retrieval)"}


def test_leakage_flags_another_clients_unique_text_in_a_store(root, embedder):
    root_dir, manifest = root
    fact = manifest["clients"][VICTIM]["facts"][0]
    victim_docs = {d.id: d for d in load_client_data(root_dir, VICTIM).documents}
    ingest(root_dir, CLIENT, embedder, [victim_docs[fact["doc_id"]]])

    planted = leakage(root_dir, embedder)

    leaked = {(leak["victim"], leak["observer"], leak["doc_id"]) for leak in planted.evidence["leaks"]}
    assert planted.verdict == Verdict.FAIL
    assert leaked == {(VICTIM, CLIENT, fact["doc_id"])}
    assert all(leak["item"].startswith("unique n-gram") for leak in planted.evidence["leaks"])
