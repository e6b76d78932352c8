"""Record types of the synthetic federated data, and how they are read and written (JSONL)."""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from pfi_rag import layout
from pfi_rag.storage import atomic_write_text


class Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Document(Record):
    """A personal document; ``id`` is stable across versions of the same document."""

    id: str
    text: str
    metadata: dict[str, Any] = Field(default_factory=dict)


class QAPair(Record):
    """A held-out question whose answer is stated in document ``doc_id``."""

    question: str
    answer: str
    doc_id: str


class Instruction(Record):
    """An instruction-tuning pair; training masks the prompt and learns the response."""

    prompt: str
    response: str


class CounterfactualPair(Record):
    """Two prompts that differ only in a demographic attribute, scored on the same options."""

    attribute: str
    prompt_a: str
    prompt_b: str
    group_a: str
    group_b: str
    options: list[str]


class EvalText(Record):
    text: str


class RefusalPrompt(Record):
    prompt: str
    category: str


R = TypeVar("R", bound=Record)


def write_jsonl(path: Path, records: Iterable[Record]) -> None:
    lines = [record.model_dump_json() for record in records]
    atomic_write_text(path, "".join(line + "\n" for line in lines))


def read_jsonl(path: Path, record_type: type[R]) -> list[R]:
    records = []
    with open(path, encoding="utf-8") as handle:
        for number, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                records.append(record_type.model_validate(json.loads(line)))
            except (json.JSONDecodeError, ValueError) as exc:
                raise ValueError(f"{path}:{number}: not a valid {record_type.__name__}: {exc}") from None
    return records


class ClientData(BaseModel):
    """Everything one client holds locally, as the synthesiser wrote it."""

    client_id: str
    documents: list[Document]
    qa: list[QAPair]
    instructions: list[Instruction]
    updates: list[Document]
    counterfactuals: list[CounterfactualPair]


def load_client_data(data_root: Path, client_id: str) -> ClientData:
    directory = layout.client_data_dir(data_root, client_id)
    if not directory.is_dir():
        raise FileNotFoundError(
            f"client {client_id!r} has no data in {directory}: run `pfi-rag data synth` first"
        )
    return ClientData(
        client_id=client_id,
        documents=read_jsonl(directory / "documents.jsonl", Document),
        qa=read_jsonl(directory / "qa.jsonl", QAPair),
        instructions=read_jsonl(directory / "instructions.jsonl", Instruction),
        updates=read_jsonl(directory / "updates.jsonl", Document),
        counterfactuals=read_jsonl(directory / "counterfactuals.jsonl", CounterfactualPair),
    )


def load_shared_eval(data_root: Path) -> tuple[list[EvalText], list[RefusalPrompt]]:
    return (
        read_jsonl(layout.general_eval_file(data_root), EvalText),
        read_jsonl(layout.refusal_prompts_file(data_root), RefusalPrompt),
    )


def load_manifest(data_root: Path) -> dict[str, Any]:
    """Ground truth of every planted item; for probes and benchmarks, never for training."""
    return json.loads(layout.manifest_file(data_root).read_text(encoding="utf-8"))
