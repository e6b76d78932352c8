"""The shared prompt prefix cached per adapter slot: same greedy tokens as without it, reused, invalidated."""

from __future__ import annotations

import copy

import pytest
import torch

from pfi_rag.config import AdapterConfig, ServingConfig
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir
from pfi_rag.models.prefix_cache import common_prefix
from tests.generation_support import PASSAGES, QUESTION, save_strong_adapter

# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def engine_for(tiny_generator, root, *, prefix_cache: bool, cache_size: int = 4) -> Engine:
    base, tokenizer, _ = tiny_generator
    serving = ServingConfig(max_new_tokens=12, prefix_cache=prefix_cache)
    return Engine(copy.deepcopy(base), tokenizer, data_root=root, serving=serving,
                  adapter=AdapterConfig(cache_size=cache_size))  # fmt: skip


def requests() -> list[GenerationRequest]:
    history = [
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": QUESTION},
    ]
    return [
        GenerationRequest("c1", QUESTION, passages=PASSAGES),
        GenerationRequest("c2", "Which car service?", passages=PASSAGES[2:]),
        GenerationRequest("nobody", "Write a poem about the sea.", passages=[]),  # base model, slot 0
        GenerationRequest("c1", messages=history, passages=PASSAGES[:1]),  # history: no shared prefix
    ]


def decode(engine: Engine, batched: bool) -> list[list[int]]:
    if not batched:
        return [engine.generate(r).token_ids for r in requests()]
    return [result.token_ids for result in engine.generate_together(requests())]


def test_prefix_cache_gives_the_same_greedy_tokens_alone_and_batched(tiny_generator, tmp_path):
    for i in (1, 2):
        save_strong_adapter(tiny_generator[0], client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    plain = engine_for(tiny_generator, tmp_path, prefix_cache=False)
    cached = engine_for(tiny_generator, tmp_path, prefix_cache=True)
    expected = decode(plain, batched=False)
    assert len({tuple(t) for t in expected}) == 4  # the adapters and prompts do change the answers

    alone = decode(cached, batched=False)
    prefix = cached.prefix_cache()
    assert alone == expected
    assert len(prefix.ids) >= 20  # the system turn at least
    assert (prefix.misses, prefix.hits) == (3, 0)  # c1, c2, base: computed once each; history: no prefix
    assert decode(cached, batched=True) == expected
    assert prefix.hits == 3  # the batch reused all three
    assert plain.prefix_cache() is None


def test_a_refilled_slot_computes_its_prefix_again(tiny_generator, tmp_path):
    base = tiny_generator[0]
    for i in (1, 2):
        save_strong_adapter(base, client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    reference = engine_for(tiny_generator, tmp_path, prefix_cache=False)
    ask = {c: GenerationRequest(c, QUESTION, passages=PASSAGES) for c in ("c1", "c2")}
    expected = {c: reference.generate(r).token_ids for c, r in ask.items()}
    assert expected["c1"] != expected["c2"]

    engine = engine_for(tiny_generator, tmp_path, prefix_cache=True, cache_size=1)
    first = engine.generate(ask["c1"])
    second = engine.generate(ask["c2"])  # evicts c1; c2 takes a slot, maybe c1's old one
    again = engine.generate(ask["c1"])  # back into a slot whose version changed
    got = [first.token_ids, second.token_ids, again.token_ids]
    assert got == [expected["c1"], expected["c2"], expected["c1"]]
    assert engine.prefix_cache().hits == 0  # every slot version was new: nothing stale reused


def test_common_prefix():
    assert common_prefix([[1, 2, 3], [1, 2, 4], [1, 2]]) == [1, 2]
    assert common_prefix([[5], [6]]) == []
    assert torch.equal(torch.tensor(common_prefix([[1, 2], [1, 2]])), torch.tensor([1, 2]))
