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

from pfi_rag.benchmark import realtext

# Topics with enough conversations for a client with a held-out share (files at 4 per file).
TOPICS = ("ai", "coding", "emotion", "psychology", "trivia", "humor", "literature")
conversations = realtext.conversations


def write_topic(topic: str, directory: Path, *, per_file: int = 4, max_files: int | None = None) -> Path:
    """Write ``topic`` as ``<topic>-NNN.txt`` files of ``per_file`` conversations; the directory."""
    return realtext.write_topic(topic, directory, per_file=per_file, max_files=max_files)


def write_topics(root: Path, topics: tuple[str, ...] = TOPICS[:3], **kwargs) -> dict[str, Path]:
    """One directory of .txt files per topic under ``root``: {client id: directory}."""
    return {topic: write_topic(topic, Path(root) / topic, **kwargs) for topic in topics}
