"""A client's records as token sequences for language-model training: one record, one draw.

The privacy unit is the record: a whole Document (or Instruction), never a piece of one. DP-SGD
clips each *sampled row's* gradient, so a document must contribute at most one row to a batch.
A document longer than ``max_seq_len`` tokens is cut into windows of that length (consecutive,
sharing one token so every next-token pair is learned once), and each time Poisson sampling
draws the document, one of its windows is picked at random. That pick is a randomised function
of this one record only, so clipping still bounds what the document can contribute to a step
and the accountant's record count and sample rate stay those of documents: a user's guarantee
is about their document, whatever its length. Over the draws every window is trained on, so no
part of a long document is cut off (a window as the unit would instead give a k-window document
only group privacy, k times the epsilon, and the ledger would count windows, not documents).
Instructions learn only the response; the prompt is context (labels -100) and is cut from
the front when too long.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch.utils.data import Dataset

from pfi_rag.data.records import Document, Instruction
from pfi_rag.models.scoring import token_nll

IGNORE_INDEX = -100


class Example(NamedTuple):
    """One training record as 1-D long tensors. A tuple of tensors because Opacus's Poisson
    loader reads the shapes and dtypes of ``dataset[0]``'s fields to build an empty batch when
    the very first draw of a call takes no record; fields of Python lists crashed it there."""

    input_ids: torch.Tensor
    labels: torch.Tensor  # IGNORE_INDEX where the token is context, not a target


def _example(input_ids: list[int], labels: list[int]) -> Example:
    return Example(torch.tensor(input_ids, dtype=torch.long), torch.tensor(labels, dtype=torch.long))


def document_windows(tokenizer, document: Document, max_len: int) -> list[Example]:
    """The document as consecutive windows of at most ``max_len`` tokens; neighbours share one
    token (the last target of one is the first input of the next), so every next-token pair of
    ``BOS text EOS`` is a target in exactly one window."""
    # BOS first so the first word of the text is predicted too (scoring.py conditions alike).
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start, *tokenizer(document.text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    if len(ids) <= max_len:
        return [_example(ids, list(ids))]
    stride = max_len - 1
    return [_example(ids[s : s + max_len], ids[s : s + max_len]) for s in range(0, len(ids) - 1, stride)]


def document_example(tokenizer, document: Document, max_len: int) -> Example:
    """The document's first window (its whole text when it fits in ``max_len`` tokens)."""
    return document_windows(tokenizer, document, max_len)[0]


def _instruction_texts(tokenizer, instruction: Instruction) -> tuple[str, str]:
    """(prompt, target) as the model sees them at serving time: through its chat template."""
    if getattr(tokenizer, "chat_template", None):
        user = [{"role": "user", "content": instruction.prompt}]
        prompt = tokenizer.apply_chat_template(user, add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(
            [*user, {"role": "assistant", "content": instruction.response}], tokenize=False
        )
        if full.startswith(prompt):
            return prompt, full[len(prompt) :]
    return instruction.prompt + "\n", instruction.response + (tokenizer.eos_token or "")


def instruction_example(tokenizer, instruction: Instruction, max_len: int) -> Example:
    prompt, target = _instruction_texts(tokenizer, instruction)
    # Tokenized apart so no token straddles the prompt/response boundary.
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    target_ids = tokenizer(target, add_special_tokens=False)["input_ids"][: max_len - 1]
    # Keep the end of the prompt (nearest the answer) and at least one target token.
    keep = max_len - len(target_ids)  # >= 1
    prompt_ids = prompt_ids[-keep:]
    return _example(prompt_ids + target_ids, [IGNORE_INDEX] * len(prompt_ids) + list(target_ids))


class RecordDataset(Dataset):
    """One item per record (the DP unit); a record is the list of its windows.

    ``dataset[i]`` (what the training loaders fetch) is one window of record ``i``, picked at
    random on every fetch. A slice (what ``record_losses`` reads) gives each record's evaluation
    window instead, drawn once, so losses before and after training compare the same tokens.
    Iteration yields the evaluation windows too.
    """

    def __init__(self, records: list[list[Example]], seed: int | None = None) -> None:
        if any(not windows for windows in records):
            raise ValueError("every record needs at least one window")
        self.records = records
        self._rng = random.Random(seed)
        self._evaluation = [windows[self._rng.randrange(len(windows))] for windows in records]

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self._evaluation[index]
        windows = self.records[index]
        return windows[0] if len(windows) == 1 else windows[self._rng.randrange(len(windows))]

    def __iter__(self):
        return iter(self._evaluation)

    @property
    def windows(self) -> int:
        return sum(len(windows) for windows in self.records)


def build_examples(
    tokenizer,
    documents: Sequence[Document],
    instructions: Sequence[Instruction],
    *,
    max_len: int,
    seed: int | None = None,
) -> RecordDataset:
    """Each document (all its windows) and each instruction as one record; ``seed`` fixes the
    window picks (None: from the OS)."""
    records = [document_windows(tokenizer, d, max_len) for d in documents]
    records += [[instruction_example(tokenizer, i, max_len)] for i in instructions]
    return RecordDataset(records, seed)


class Collate:
    """Right-pad a batch so positions stay 0..n (as in scoring); padding is never a target."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, rows: list[Example]) -> dict[str, torch.Tensor]:
        width = max(len(row.input_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[i, :n] = row.input_ids
            attention[i, :n] = 1
            labels[i, :n] = row.labels
        return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


def batch_size_of(batch) -> int:
    """Rows in a batch; Opacus's Poisson loader yields 0-row tensors (a dict after a first
    non-empty batch, a list of them when the first draw is empty) for empty batches."""
    if isinstance(batch, dict):
        return int(batch["input_ids"].shape[0])
    return 0


def sequence_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean next-token NLL of each sequence over its target tokens: one loss per record, (B,)."""
    nll = token_nll(logits, labels, IGNORE_INDEX)  # (B, T-1)
    counts = (labels[:, 1:] != IGNORE_INDEX).sum(dim=1).clamp(min=1).to(nll.device)  # (B,)
    return nll.sum(dim=1) / counts
