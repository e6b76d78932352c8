"""The serving engine's KV caches on SmolLM2-135M, fp32.

    .venv/bin/python bench/kv_cache.py [--part steps|prefix|both]

``steps``: decode steps of 8 rows at ~300 cached positions, DynamicCache vs pfi-rag's
preallocated cache, one step of each in turn (so drifting load hits both alike), medians of 20
steps after 4 warm-up steps.

``prefix``: the shared prompt prefix (pfi_rag/models/prefix_cache.py). Synthetic clients, each
with its own LoRA adapter, ask their held-out questions with the 4 passages their own store
retrieves (relevance floor on): the prefix's share of the prompt tokens, and the prefill time
of a request alone and of 8 requests on 8 adapters, with the prefix cache on (already computed
for those adapters) and off, interleaved; medians. The first tokens must be the same.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers.cache_utils import DynamicCache

from pfi_rag.config import ModelsConfig
from pfi_rag.models.kv_cache import preallocated_cache
from pfi_rag.models.loading import load_generator

ROWS, CACHED = 8, 300


def steps() -> None:
    model = load_generator(ModelsConfig())[0].eval()
    ids = torch.randint(100, 1000, (ROWS, CACHED), generator=torch.Generator().manual_seed(0))
    makers = {
        "dynamic": lambda: DynamicCache(config=model.config),
        "preallocated": lambda: preallocated_cache(model.config),
    }
    caches, tokens, times = {}, {}, {name: [] for name in makers}
    with torch.inference_mode():
        for name, make in makers.items():
            caches[name] = make()
            out = model(input_ids=ids, cache=caches[name], use_cache=True, logits_to_keep=1)
            tokens[name] = out.logits[:, -1:].argmax(-1)  # (B, 1)
        for _ in range(24):
            for name in makers:
                started = time.perf_counter()
                out = model(input_ids=tokens[name], cache=caches[name], use_cache=True, logits_to_keep=1)
                tokens[name] = out.logits[:, -1:].argmax(-1)
                times[name].append(time.perf_counter() - started)
    for name, steps in times.items():
        median_ms = statistics.median(steps[4:]) * 1000
        print(f"{name:<13} {ROWS} rows, {CACHED}+ cached positions: median step {median_ms:.1f} ms")


def prefix(clients: int, questions: int, repeats: int) -> None:
    sys.path.insert(0, str(Path(__file__).parent))
    from generate import make_adapters  # bench/generate.py

    from pfi_rag.config import RetrievalConfig, ServingConfig
    from pfi_rag.data.records import load_client_data
    from pfi_rag.data.synth import synthesize
    from pfi_rag.models import Engine, GenerationRequest
    from pfi_rag.models.loading import load_embedder
    from pfi_rag.retriever import ClientStore

    root = Path(tempfile.mkdtemp(prefix="pfi-prefix-"))
    synthesize(root, clients=clients, seed=0)
    names = [f"client-{i:02d}" for i in range(clients)]
    models, retrieval = ModelsConfig(), RetrievalConfig()
    embedder = load_embedder(models)
    requests = []
    for client in names:
        data = load_client_data(root, client)
        with ClientStore.open(root, client, retrieval, embedder) as store:
            store.add_documents(data.documents)
            for qa in data.qa[:questions]:
                hits = store.search(qa.question, retrieval.top_k)
                requests.append(GenerationRequest(client, qa.question, passages=hits, max_new_tokens=1))
    base, tokenizer, _ = load_generator(models)
    make_adapters(base, root, names)
    engines = {}
    for on in (True, False):
        model = base if not on else load_generator(models)[0]
        serving = ServingConfig(prefix_cache=on)
        engines[on] = Engine(model, tokenizer, data_root=root, serving=serving,
                             relevance_floor=retrieval.relevance_floor)  # fmt: skip
    cache = engines[True].prefix_cache()
    jobs = [engines[True].prepare(r) for r in requests]
    lengths = [len(job.prompt.input_ids) for job in jobs]
    for job in jobs:
        job.lease.release()
    share = len(cache.ids) * len(lengths) / sum(lengths)
    print(
        f"{len(requests)} requests from {clients} clients, 4 retrieved passages "
        f"(floor {retrieval.relevance_floor}): "
        f"prompt tokens median {statistics.median(lengths):.0f} (min {min(lengths)}, max {max(lengths)}); "
        f"shared prefix {len(cache.ids)} tokens = {share:.0%} of all prompt tokens"
    )

    def prefill(engine, group) -> tuple[float, list[int]]:
        prepared = [engine.prepare(r) for r in group]
        batch = engine.new_batch()
        started = time.perf_counter()
        batch.add([job.row for job in prepared])
        elapsed = time.perf_counter() - started
        first = [engine.finish(job).token_ids[:1] for job in prepared]
        return elapsed, first

    firsts = {on: prefill(engines[on], requests)[1] for on in engines}  # warm-up: every adapter's prefix
    assert firsts[True] == firsts[False], "the prefix cache changed a first token"
    one = {on: [] for on in engines}
    eight = {on: [] for on in engines}
    groups = [requests[i::questions][:8] for i in range(questions)]  # 8 clients, one question each
    for repeat in range(repeats):
        for on in (True, False) if repeat % 2 == 0 else (False, True):
            for request in requests:
                one[on].append(prefill(engines[on], [request])[0])
            for group in groups:
                eight[on].append(prefill(engines[on], group)[0])
    for label, times in (("alone", one), ("8 adapters batched", eight)):
        on, off = statistics.median(times[True]) * 1000, statistics.median(times[False]) * 1000
        print(f"prefill {label:<19} prefix cache on {on:6.1f} ms, off {off:6.1f} ms = {on / off:.2f}x")
    print(f"prefix cache: {cache.hits} hits, {cache.misses} misses; first tokens identical on and off: True")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["steps", "prefix", "both"], default="both")
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--questions", type=int, default=2, help="held-out questions per client")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.part in ("steps", "both"):
        steps()
    if args.part in ("prefix", "both"):
        prefix(args.clients, args.questions, args.repeats)
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")


if __name__ == "__main__":
    main()
