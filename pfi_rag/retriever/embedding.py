"""Turning texts into normalised vectors with the process's one embedder."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

# Embedded once per store and kept in its metadata: a store reopened with another embedder
# would mix vectors from two spaces and rank nonsense, so opening it is refused instead.
FINGERPRINT_TEXT = "pfi-rag embedder fingerprint: the quick brown fox jumps over the lazy dog"
FINGERPRINT_MIN_COSINE = 0.98


def embed(embedder, texts: Sequence[str], batch_size: int) -> np.ndarray:
    """(N, D) float32, unit L2 norm, so inner product is cosine similarity."""
    if not texts:  # e.g. only documents the tokenizer finds nothing in (control characters)
        return np.empty((0, dimension(embedder)), dtype=np.float32)
    vectors = embedder.encode(
        list(texts),
        batch_size=batch_size,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=False,
    )
    return np.ascontiguousarray(vectors, dtype=np.float32).reshape(len(texts), -1)


def dimension(embedder) -> int:
    # sentence-transformers 6 renamed get_sentence_embedding_dimension; accept both.
    getter = getattr(embedder, "get_embedding_dimension", None) or embedder.get_sentence_embedding_dimension
    return int(getter())


def max_tokens(embedder) -> int | None:
    """The longest input the embedder reads without truncating (None if it does not say)."""
    limit = getattr(embedder, "max_seq_length", None)
    return int(limit) if limit else None
