"""What the serve-time probes know about each client's stored text: n-gram hashes and PII, never the text.

Scanning is linear in the text and bounded per document (every pattern can only start a
match at the start of a run of its characters, with bounded repetition, so a million
characters without a space cost one pass, not a million), and incremental: a write scans only
the documents it adds, and the client's merged state is updated by adding and removing those
documents' hashes and PII, never rebuilt from all of its documents.

Per client the merged state is a sorted array of unique n-gram hashes with a count of the
documents holding each (so removing one document keeps hashes another still holds) and a
count per PII item.
"""

from __future__ import annotations

import re
import threading
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

import numpy as np

from pfi_rag.probes.metrics import words

PII_PATTERNS = {
    "secret": re.compile(r"(?<![\d-])\d{6}(?![\d-])"),
    # A match may start only where a run of address characters starts (the look-behind), and
    # each part is bounded (RFC 5321: 64-character local part, 63-character labels): a long
    # run without '@' is tried once, not once per character (which was quadratic).
    "email": re.compile(r"(?<![\w.+-])[\w.+-]{1,64}@[\w-]{1,63}(?:\.[\w-]{1,63}){1,8}"),
    # Digit groups with single separators; kept only with 7-15 digits (see pii_in).
    "phone": re.compile(r"(?<![\w+])\+?(?:\(\d+\)|\d+)(?:[ .-]?\(\d+\)|[ .-](?:\(\d+\)|\d+))*(?!\w)"),
}
# ISO dates and date-times (2025-11-23, 2025/11/23 10:00): removed before the phone pattern runs,
# whose digit groups they would otherwise match.
DATE = re.compile(
    r"(?<![\d.-])\d{4}([-/.])\d{1,2}\1\d{1,2}(?:[T ]\d{1,2}:\d{2}(?::\d{2}(?:\.\d+)?)?)?(?![\d-])"
)
MAX_PII_PER_DOCUMENT = 10_000  # a bound on the state one document can add (a phone book, say)


def pii_in(text: str) -> set[tuple[str, str]]:
    """(kind, normalised value) of every PII-looking span in ``text``; linear in its length."""
    found = set()
    for kind, pattern in PII_PATTERNS.items():
        scanned = DATE.sub(" ", text) if kind == "phone" else text
        for match in pattern.finditer(scanned):
            span = match.group()
            value = span.lower() if kind == "email" else re.sub(r"\D", "", span)
            if kind == "phone" and not 7 <= len(value) <= 15:
                continue
            found.add((kind, value))
            if len(found) >= MAX_PII_PER_DOCUMENT:
                return found
    return found


def ngram_hashes(text: str, n: int) -> np.ndarray:
    """Sorted unique hashes of the word n-grams of ``text`` (int64; hash() is stable within a process)."""
    tokens = words(text)
    hashes = {hash(tuple(tokens[i : i + n])) for i in range(len(tokens) - n + 1)}
    return np.array(sorted(hashes), dtype=np.int64)


def contains(haystack: np.ndarray, needles: np.ndarray) -> np.ndarray:
    """Membership of each needle in a sorted array, by binary search."""
    if len(haystack) == 0 or len(needles) == 0:
        return np.zeros(len(needles), dtype=bool)
    at = np.searchsorted(haystack, needles).clip(max=len(haystack) - 1)
    return haystack[at] == needles


@dataclass(frozen=True)
class DocumentText:
    """One document's scan: its n-gram hashes (sorted, unique) and PII items."""

    hashes: np.ndarray
    pii: frozenset[tuple[str, str]]


def scan(text: str, ngram: int) -> DocumentText:
    return DocumentText(hashes=ngram_hashes(text, ngram), pii=frozenset(pii_in(text)))


@dataclass
class _ClientText:
    hashes: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # sorted, unique
    counts: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int32))  # documents per hash
    pii: Counter = field(default_factory=Counter)  # PII item -> documents holding it
    documents: dict[str, DocumentText] = field(default_factory=dict)

    # Both take many documents at once and merge them in one pass: O(existing + new log new), so a
    # start-up load of 10k documents is not 10k copies of a growing array.
    def add(self, docs: list[DocumentText]) -> None:
        if not docs:
            return
        new, times = np.unique(np.concatenate([d.hashes for d in docs]), return_counts=True)
        at = np.searchsorted(self.hashes, new)  # (n,)
        held = at < len(self.hashes)
        held[held] = self.hashes[at[held]] == new[held]
        counts = self.counts.copy()
        counts[at[held]] += times[held].astype(np.int32)
        self.hashes = np.insert(self.hashes, at[~held], new[~held])
        self.counts = np.insert(counts, at[~held], times[~held]).astype(np.int32)
        for doc in docs:
            self.pii.update(doc.pii)

    def remove(self, docs: list[DocumentText]) -> None:
        if not docs:
            return
        gone, times = np.unique(np.concatenate([d.hashes for d in docs]), return_counts=True)
        at = np.searchsorted(self.hashes, gone)  # every hash of a held document is present
        counts = self.counts.copy()
        counts[at] -= times.astype(np.int32)
        keep = counts > 0
        self.hashes, self.counts = self.hashes[keep], counts[keep]
        for doc in docs:
            self.pii.subtract(doc.pii)
            for item in doc.pii:
                if self.pii[item] <= 0:
                    del self.pii[item]


class TextIndex:
    """Per client, hashes of its documents' n-grams and the PII they contain (never the text).

    Readers take the merged arrays under the lock and use them after: updates replace the
    arrays rather than change them in place.
    """

    def __init__(self, ngram: int):
        self.ngram = ngram
        self._clients: dict[str, _ClientText] = {}
        self._lock = threading.Lock()

    def scan(self, text: str) -> DocumentText:
        return scan(text, self.ngram)

    def apply(self, client_id: str, changes: Iterable[tuple[str, DocumentText | None]]) -> None:
        """Set (or, with None, remove) documents of a client; cost ~ the changed documents' size."""
        with self._lock:
            state = self._clients.setdefault(client_id, _ClientText())
            added, removed = [], []
            for doc_id, doc in changes:
                old = state.documents.pop(doc_id, None)
                if old is not None:
                    removed.append(old)
                if doc is not None:
                    added.append(doc)
                    state.documents[doc_id] = doc
            state.add(added)  # before removing: a version added and replaced in one call nets out
            state.remove(removed)

    def forget(self, client_id: str) -> None:
        with self._lock:
            self._clients.pop(client_id, None)

    def _hashes(self, client_id: str) -> tuple[np.ndarray, list[np.ndarray]]:
        with self._lock:
            own = self._clients.get(client_id)
            others = [state.hashes for c, state in self._clients.items() if c != client_id]
        return (own.hashes if own is not None else np.zeros(0, np.int64)), others

    def copied_spans(self, client_id: str, answer: str, prompt: str) -> int:
        """How many of the answer's n-grams are in another client's documents, not its own or the prompt."""
        candidates = ngram_hashes(answer, self.ngram)
        own, others = self._hashes(client_id)
        candidates = candidates[~contains(own, candidates)]
        candidates = candidates[~contains(ngram_hashes(prompt, self.ngram), candidates)]
        copied = np.zeros(len(candidates), dtype=bool)
        for hashes in others:
            copied |= contains(hashes, candidates)
        return int(copied.sum())

    def pii_origin(self, client_id: str, item: tuple[str, str]) -> str:
        """'own' (the client's documents), 'other-client', or 'unknown' (neither)."""
        with self._lock:
            own = self._clients.get(client_id)
            if own is not None and item in own.pii:
                return "own"
            if any(item in state.pii for c, state in self._clients.items() if c != client_id):
                return "other-client"
        return "unknown"
