"""Prefill attention of the served engine: eager against SDPA, where the lean step decodes.

    .venv/bin/python bench/prefill_attention.py [--repeats 5] [--copies 6] [--rows 1,8]

Two engines as `pfi-rag serve` builds them (``Engine.from_config``, default model, 1 thread), one
with ``models.attn_implementation = "eager"`` and one with ``"auto"`` (SDPA for prefill where
the lean step decodes, docs/serving.md). Each answers the same RAG requests (a question and
4 passages of ``--copies`` sentences each) for one token: the time to the first token, which is
prefill. ``--rows``: how many requests at once (1: one alone; 8: one batch of 8 clients on the
base model, prefilled together). The engines take turns, so a shared machine's load hits both
alike; medians. The first tokens must be the same.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from pfi_rag.config import Config, ModelsConfig
from pfi_rag.models.generation import Engine, GenerationRequest

SENTENCE = (
    "The quarterly maintenance report lists the boiler inspection, the roof repair and the "
    "parking permits for each tenant, with the dates they are due and who signs them off. "
)
QUESTION = "When is the boiler inspection due and who signs it off?"


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str
    score: float


def first_tokens(engine: Engine, requests: list[GenerationRequest]) -> tuple[float, list[list[int]]]:
    """Seconds to answer ``requests`` together with one token each, and those tokens."""
    batch = engine.new_batch()
    jobs = [engine.prepare(request) for request in requests]
    started = time.perf_counter()
    batch.add([job.row for job in jobs])
    seconds = time.perf_counter() - started
    while len(batch):
        batch.step()
    return seconds, [engine.finish(job).token_ids for job in jobs]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--copies", type=int, default=6, help="sentences per passage")
    parser.add_argument("--rows", default="1,8", help="requests prefilled together, comma-separated")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp())
    passages = [Passage(f"doc-{i}", SENTENCE * args.copies, 0.9 - 0.1 * i) for i in range(4)]
    engines = {}
    for setting in ("eager", "auto"):
        models = ModelsConfig(device="cpu", threads=1, attn_implementation=setting)
        engines[setting] = Engine.from_config(Config(data_root=root, models=models))
    for rows in [int(r) for r in args.rows.split(",")]:
        requests = [
            GenerationRequest(f"client-{i}", QUESTION, passages=passages, max_new_tokens=1)
            for i in range(rows)
        ]
        prompt = engines["auto"].prepare(requests[0]).row.prompt_ids
        times: dict[str, list[float]] = {setting: [] for setting in engines}
        tokens = {}
        for _ in range(args.repeats):
            for setting, engine in engines.items():
                seconds, tokens[setting] = first_tokens(engine, requests)
                times[setting].append(seconds)
        eager, sdpa = (statistics.median(times[s]) for s in ("eager", "auto"))
        print(
            f"{rows} request(s) of {len(prompt)} prompt tokens: prefill eager {eager * 1e3:.0f} ms, "
            f"sdpa {sdpa * 1e3:.0f} ms = {sdpa / eager:.2f}x (median of {args.repeats}); "
            f"same first tokens: {tokens['eager'] == tokens['auto']}"
        )


if __name__ == "__main__":
    main()
