"""Split a document into overlapping windows that fit the embedder's token limit.

Windows are counted in the embedder's own tokens (not characters or words), so no chunk is
silently truncated by the embedder, and each chunk's text is a slice of the original text
(offsets from the fast tokenizer), never a lossy detokenisation.
"""

from __future__ import annotations

from dataclasses import dataclass

# Special tokens the embedder adds around every input ([CLS] ... [SEP] for BERT-like models).
SPECIAL_TOKENS = 2


@dataclass(frozen=True)
class Chunk:
    position: int  # 0-based order of the chunk within its document
    start: int  # character offsets of the chunk in the document text
    end: int
    text: str


def window_size(chunk_tokens: int, chunk_overlap: int, embedder_max_tokens: int | None) -> tuple[int, int]:
    """The (size, overlap) in tokens actually used: the config, capped by the embedder's limit."""
    size = chunk_tokens
    if embedder_max_tokens:
        size = min(size, embedder_max_tokens - SPECIAL_TOKENS)
    if size < 1:
        raise ValueError(f"the embedder accepts only {embedder_max_tokens} tokens; too few to chunk")
    # The config guarantees overlap < chunk_tokens; a smaller embedder cap must keep progress.
    overlap = min(chunk_overlap, size // 2)
    return size, overlap


def chunk_text(text: str, tokenizer, *, size: int, overlap: int) -> list[Chunk]:
    """Token windows of at most ``size`` tokens, consecutive windows sharing ``overlap`` tokens.

    A window that would end inside a word is shortened to the last word boundary (when one
    exists in its second half), and the next window starts at a word's first token, so words
    are not cut between chunks.
    """
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets: list[tuple[int, int]] = encoded["offset_mapping"]
    if not offsets:
        return []
    chunks: list[Chunk] = []
    first = 0
    while True:
        last = min(first + size, len(offsets))  # exclusive
        if last < len(offsets):
            last = _word_boundary(offsets, first, last)
        start, end = offsets[first][0], offsets[last - 1][1]
        chunks.append(Chunk(position=len(chunks), start=start, end=end, text=text[start:end]))
        if last == len(offsets):
            return chunks
        first = _word_start(offsets, max(last - overlap, first + 1), floor=first + 1)


def _word_start(offsets: list[tuple[int, int]], index: int, *, floor: int) -> int:
    """Move ``index`` back (not below ``floor``) to the first token of the word it is in."""
    while index > floor and offsets[index][0] == offsets[index - 1][1]:
        index -= 1
    return index


def _word_boundary(offsets: list[tuple[int, int]], first: int, last: int) -> int:
    """The largest ``cut`` in (first + half, last] where token ``cut`` starts a new word."""
    floor = first + (last - first) // 2
    for cut in range(last, floor, -1):
        if offsets[cut][0] > offsets[cut - 1][1]:  # a gap (whitespace) before token ``cut``
            return cut
    return last
