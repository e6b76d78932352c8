"""Clients made of real text nobody on this project wrote: the chatterbot-corpus English topics.

Why this corpus: it ships on PyPI (a dev extra, so tests read it offline, no hub), is BSD
licensed, is plain English written by its own community, comes already divided by topic (one
topic = one client, and topics differ in vocabulary the way users' documents do), and its
documents vary in length: ``coding`` answers run past 128 tokens, so windowed training is
exercised, while ``emotion`` is short chat. Each topic's conversations become ``.txt`` files,
a few conversations per file, one utterance per line, as a user's exported chats would.

Use::

    from tests.realtext import write_topic
    directory = write_topic("coding", tmp_path / "coding")   # then `pfi-rag ingest --client coding <dir>/`
"""

from __future__ import annotations

from pathlib import Path

import chatterbot_corpus
import yaml

CORPUS = Path(chatterbot_corpus.__file__).resolve().parent / "data" / "english"
# Topics with enough conversations for a client with a held-out share (files at 4 per file).
TOPICS = ("ai", "coding", "emotion", "psychology", "trivia", "humor", "literature")


def conversations(topic: str) -> list[list[str]]:
    """The topic's conversations, each a list of utterances, as the corpus ships them."""
    data = yaml.safe_load((CORPUS / f"{topic}.yml").read_text(encoding="utf-8"))
    return [[str(line).strip() for line in conv if str(line).strip()] for conv in data["conversations"]]


def write_topic(
    topic: str, directory: Path, *, per_file: int = 4, max_files: int | None = None
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


def write_topics(root: Path, topics: tuple[str, ...] = TOPICS[:3], **kwargs) -> dict[str, Path]:
    """One directory of .txt files per topic under ``root``: {client id: directory}."""
    return {topic: write_topic(topic, Path(root) / topic, **kwargs) for topic in topics}
