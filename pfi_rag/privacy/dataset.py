"""A client's records as token sequences for language-model training: one record, one sequence.

The record is the privacy unit of DP-SGD, so each Document or Instruction becomes exactly one
training example (never split, never merged): per-sample clipping then bounds what any one
record can contribute. Documents are learned whole; instructions learn only the response, the
prompt is context (its labels are masked with -100).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch

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


def document_example(tokenizer, document: Document, max_len: int) -> Example:
    # BOS first so the first word of the text is predicted too (scoring.py conditions alike).
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    ids = [start, *tokenizer(document.text, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    ids = ids[:max_len]
    return _example(ids, list(ids))


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


def build_examples(
    tokenizer, documents: Sequence[Document], instructions: Sequence[Instruction], *, max_len: int
) -> list[Example]:
    return [document_example(tokenizer, d, max_len) for d in documents] + [
        instruction_example(tokenizer, i, max_len) for i in instructions
    ]


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
