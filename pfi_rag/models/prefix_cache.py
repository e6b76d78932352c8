"""The prompt prefix every request starts with, computed once per adapter and reused.

Every prompt opens with the same tokens: the chat template's system turn (``serving.system_prompt``)
and the start of the user turn up to ``Notes:``. With LoRA on the attention projections
(``q_proj``, ``v_proj`` by default) the keys and values of those tokens depend on the adapter, so
the cache holds one prefix per gathered-LoRA slot *version*: an adapter's prefix is computed by
its first request, reused by the next ones, and forgotten when the slot is emptied or refilled
(the version changes). The base model is slot 0.

A row whose prompt starts with the prefix is prefilled as ``[cached prefix][padding][its own
suffix]``: the prefix's keys and values are copied into the batch's cache, only the suffix goes
through the model (positions continue from the prefix, the padding is masked). Greedy tokens
are the same as without the cache (tests/test_kv_prefix.py).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from pfi_rag.models.prompting import build_prompt


@dataclass(frozen=True)
class _Passage:
    doc_id: str
    text: str
    score: float


def common_prefix(sequences: Sequence[Sequence[int]]) -> list[int]:
    first = list(sequences[0])
    end = len(first)
    for other in sequences[1:]:
        end = min(end, len(other))
        for i in range(end):
            if other[i] != first[i]:
                end = i
                break
    return first[:end]


def shared_prefix_ids(tokenizer, system_prompt: str) -> list[int]:
    """Tokens every prompt built by :func:`build_prompt` starts with, whatever its question and notes."""
    variants = [
        ("What is my dog's name?", [_Passage("a", "My dog is called Rex.", 1.0)]),
        ("When is the meeting?", [_Passage("b", "Meeting on Friday at ten.", 1.0), _Passage("c", "x", 0.5)]),
        ("Write a poem.", []),
    ]
    prompts = [
        build_prompt(
            tokenizer,
            messages=[{"role": "user", "content": question}],
            passages=passages,
            system_prompt=system_prompt,
            max_prompt_tokens=1 << 20,
        ).input_ids
        for question, passages in variants
    ]
    return common_prefix(prompts)


class PrefixCache:
    """Keys and values of ``ids`` per adapter slot version, at most ``max_entries`` (least recent leave)."""

    def __init__(self, ids: Sequence[int], *, max_entries: int = 32):
        self.ids = list(ids)
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = self.misses = 0

    def __len__(self) -> int:
        return len(self.ids)

    def matches(self, prompt_ids: Sequence[int]) -> bool:
        """Whether a prompt starts with the prefix and has at least one token of its own after it."""
        n = len(self.ids)
        return n > 0 and len(prompt_ids) > n and list(prompt_ids[:n]) == self.ids

    def get(self, key: tuple[int, int]) -> list[tuple[torch.Tensor, torch.Tensor]] | None:
        """Per layer ``(keys, values)``, each (1, kv_heads, P, head_dim), or None."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                self.misses += 1
                return None
            self._entries.move_to_end(key)
            self.hits += 1
            return entry

    def put(self, key: tuple[int, int], layers: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        with self._lock:
            self._entries[key] = layers
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
