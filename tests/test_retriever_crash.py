"""A process SIGKILLed in the middle of an ingest leaves a store that reopens in agreement."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap

import numpy as np

from pfi_rag.config import RetrievalConfig
from pfi_rag.data.records import Document
from pfi_rag.retriever import ClientStore
from pfi_rag.retriever import index as vindex

# The child ingests documents in batches of 8 chunks and reports each committed batch through
# the progress callback; the parent kills it while later batches are still being written.
CHILD = textwrap.dedent(
    """
    import sys
    from pfi_rag.config import ModelsConfig, RetrievalConfig
    from pfi_rag.data.records import Document
    from pfi_rag.models.loading import load_embedder
    from pfi_rag.retriever import ClientStore

    root, cache = sys.argv[1], sys.argv[2]
    embedder = load_embedder(ModelsConfig(device="cpu", cache_dir=cache))
    docs = [Document(id=f"doc-{i:04d}", text=f"Entry {i}: parcel {i} went to shelf {i % 17}.")
            for i in range(4000)]
    done = 0
    def progress(n):
        global done
        done += n
        print(done, flush=True)
    store = ClientStore.open(root, "crashy", RetrievalConfig(ingest_batch_chunks=8), embedder)
    store.add_documents(docs, progress=progress)
    print("finished", flush=True)
    """
)


def test_sigkill_mid_ingest_leaves_a_consistent_store(tmp_path, embedder, model_cache):
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(tmp_path), str(model_cache)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    committed = 0
    for line in child.stdout:
        committed = int(line)
        if committed >= 40:  # five batches are durable; the sixth is in flight
            break
    os.kill(child.pid, signal.SIGKILL)
    child.wait()
    assert child.returncode == -signal.SIGKILL

    with ClientStore.open(tmp_path, "crashy", RetrievalConfig(ingest_batch_chunks=8), embedder) as store:
        held = vindex.ids_of(store._index)
        live = store._docstore.live_ids()
        stats = store.stats()
        documents = {d.doc_id for d in store.list_documents()}
        hit = store.search("Entry 3: parcel 3 went to shelf 3.", 1)[0]

    assert stats["indexed"] == stats["chunks"] == len(documents)
    assert sorted(held.tolist()) == sorted(live.tolist())  # every index id has its row, and back
    assert {f"doc-{i:04d}" for i in range(committed)} <= documents  # reported batches survived
    assert len(documents) < 4000  # the kill really landed mid-ingest
    assert hit.doc_id == "doc-0003"


def test_ingest_after_a_crash_completes_the_store(tmp_path, embedder):
    cfg = RetrievalConfig(ingest_batch_chunks=4)
    docs = [Document(id=f"doc-{i}", text=f"Entry {i}: parcel {i} went to shelf {i}.") for i in range(10)]
    with ClientStore.open(tmp_path, "c", cfg, embedder) as store:
        store.add_documents(docs[:6])
        index_file, dim = store.directory / "faiss.index", store.dim
    # The index file lags the docstore, as after a kill between a commit and the index write.
    no_vectors = np.zeros((0, dim), dtype=np.float32)
    vindex.save(vindex.build(cfg, dim, "flat", no_vectors, np.zeros(0, dtype=np.int64)), index_file)

    with ClientStore.open(tmp_path, "c", cfg, embedder) as store:
        report = store.add_documents(docs)

        assert (report.added, report.unchanged) == (4, 6)
        assert store.stats()["indexed"] == store.stats()["chunks"] == 10
