"""Decode steps of 8 rows at ~300 cached positions: DynamicCache vs pfi-rag's preallocated cache.

    .venv/bin/python bench/kv_cache.py

Base SmolLM2-135M, fp32, one step of each cache in turn (so drifting load hits both alike),
medians of 20 steps after 4 warm-up steps.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers.cache_utils import DynamicCache

from pfi_rag.config import ModelsConfig
from pfi_rag.models.kv_cache import preallocated_cache
from pfi_rag.models.loading import load_generator

ROWS, CACHED = 8, 300


def main() -> None:
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


if __name__ == "__main__":
    main()
