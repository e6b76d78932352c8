"""The serve-time probes' text state (copy index + PII) against a client's document count.

    .venv/bin/python bench/copy_index.py

Synthetic documents of 120 words from a 5,000-word vocabulary, with an e-mail and a phone number
each. Prints, at 1k/10k/50k documents: the start-up scan (every document once), the old per-write
cost (rescanning all of the client's text, as before the index was incremental; up to 10k), and
the incremental cost of a one-document write now (scan it, merge its hashes).
"""

from __future__ import annotations

import random
import time

from pfi_rag.api.textindex import TextIndex, ngram_hashes, pii_in

VOCAB = [f"w{i}" for i in range(5000)]


def document(rng: random.Random) -> str:
    return " ".join(rng.choices(VOCAB, k=120)) + " mail a@b.com call 555-123-4567."


def main() -> None:
    rng = random.Random(0)
    print("| documents | start-up scan | one-doc write, full rescan (old) | one-doc write, incremental |")
    print("|---|---|---|---|")
    for n in (1_000, 10_000, 50_000):
        texts = [document(rng) for _ in range(n)]
        index = TextIndex(8)
        started = time.perf_counter()
        index.apply("c", [(f"d{i}", index.scan(text)) for i, text in enumerate(texts)])
        load = time.perf_counter() - started
        old = "-"
        if n <= 10_000:
            started = time.perf_counter()
            ngram_hashes("\n".join(texts), 8)
            set().union(*(pii_in(text) for text in texts))
            old = f"{time.perf_counter() - started:.2f} s"
        started = time.perf_counter()
        index.apply("c", [("new", index.scan(document(rng)))])
        new = time.perf_counter() - started
        print(f"| {n:,} | {load:.2f} s | {old} | {new * 1000:.1f} ms |", flush=True)


if __name__ == "__main__":
    main()
