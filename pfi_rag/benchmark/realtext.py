"""The real-text world of the silent-failure benchmark: clients made of text nobody here wrote.

The clients are chatterbot-corpus English topics (BSD licensed, on PyPI, so offline), one topic
per client. Each topic's conversations become ``.txt`` files (a few conversations per file, one
utterance per line, as a user's exported chats would be) and are ingested through the client's
store, the code ``pfi-rag ingest`` runs. Nothing else is written: no manifest, no synthetic
questions, no shared files. The failures planted on them need no synthetic ground truth
(:data:`~pfi_rag.benchmark.scenarios.REALTEXT_SCENARIOS`).
"""

from __future__ import annotations

from pathlib import Path

from pfi_rag.config import Config

# Four topics of different sizes and vocabularies (105, 48, 63 and 261 conversations).
TOPICS = ("ai", "emotion", "psychology", "trivia")
TARGET = "ai"  # the client that carries a single-client failure
PER_FILE = 2  # conversations per .txt file

# What the probes need on clients without a manifest, at the benchmark's scale: audit canaries
# (exposure, the one-run audit), a held-out share (membership, cloze items), short passages.
OVERRIDES = {
    "federation.clients": len(TOPICS),
    "privacy.audit_canaries": 16,
    "data.held_out_share": 0.2,
    "retrieval.chunk_tokens": 64,
    "retrieval.chunk_overlap": 8,
    "retrieval.top_k": 2,
    "probes.cloze_items": 32,
    "probes.answer_tokens": 4,
}


class RealTextUnavailable(RuntimeError):
    """chatterbot-corpus is not installed."""


def corpus_dir() -> Path:
    """The corpus's English topics; :class:`RealTextUnavailable` says how to install it."""
    try:
        import chatterbot_corpus
    except ImportError:
        raise RealTextUnavailable(
            "the real-text world needs chatterbot-corpus: pip install chatterbot-corpus"
        ) from None
    return Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"


def conversations(topic: str) -> list[list[str]]:
    """The topic's conversations, each a list of utterances, as the corpus ships them."""
    import yaml

    path = corpus_dir() / f"{topic}.yml"
    if not path.is_file():
        raise RealTextUnavailable(f"chatterbot-corpus has no English topic {topic!r}")
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    return [[str(line).strip() for line in conv if str(line).strip()] for conv in data["conversations"]]


def write_topic(
    topic: str, directory: Path, *, per_file: int = PER_FILE, max_files: int | None = None
) -> Path:
    """Write ``topic`` as ``<topic>-NNN.txt`` files of ``per_file`` conversations; the directory."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    convs = [c for c in conversations(topic) if c]
    groups = [convs[i : i + per_file] for i in range(0, len(convs), per_file)]
    for number, group in enumerate(groups[:max_files]):
        text = "\n\n".join("\n".join(conv) for conv in group) + "\n"
        (directory / f"{topic}-{number:03d}.txt").write_text(text, encoding="utf-8")
    return directory


def write_topics(root: Path, topics: tuple[str, ...] = TOPICS, **kwargs) -> dict[str, Path]:
    """One directory of .txt files per topic under ``root``: {client id: directory}."""
    return {topic: write_topic(topic, Path(root) / topic, **kwargs) for topic in topics}


def build_clients(cfg: Config, text_dir: Path, embedder, *, topics: tuple[str, ...] = TOPICS) -> list[str]:
    """Write each topic's .txt files under ``text_dir`` and ingest them into the client of that
    name under ``cfg.data_root``, as ``pfi-rag ingest --client TOPIC DIR/`` does; the clients."""
    from pfi_rag.retriever import ClientStore
    from pfi_rag.retriever.sources import read_paths

    for client, directory in write_topics(text_dir, topics).items():
        batches = read_paths([directory], cfg.retrieval.max_file_bytes)
        with ClientStore.open(cfg.data_root, client, cfg.retrieval, embedder) as store:
            for source, docs in batches:
                store.add_documents(docs, source=source)
    return list(topics)
