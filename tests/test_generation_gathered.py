"""Gathered LoRA on the tiny random Llama: same numbers as PEFT, slots filled and freed while decoding."""

from __future__ import annotations

import copy

import pytest
import torch

from pfi_rag.config import AdapterConfig, ServingConfig
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir
from tests.generation_support import PASSAGES, QUESTION, save_random_adapter, save_strong_adapter

# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(tiny_generator, root, *, cache_size: int = 8, gathered: bool = True) -> Engine:
    base, tokenizer, _ = tiny_generator
    return Engine(
        copy.deepcopy(base),
        tokenizer,
        data_root=root,
        serving=ServingConfig(max_new_tokens=10, gathered_lora=gathered),
        adapter=AdapterConfig(cache_size=cache_size),
    )


def test_gathered_mixed_batch_gives_peft_logits_row_for_row(tiny_generator, tmp_path):
    base = tiny_generator[0]
    for i in range(1, 4):
        save_random_adapter(base, client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    engine = make_engine(tiny_generator, tmp_path)
    leases = [engine.adapters.acquire(client) for client in ["c1", "c2", "c3", "nobody"]]
    assert sorted(lease.slot for lease in leases) == [0, 1, 2, 3]  # base is slot 0, one slot each
    ids = torch.randint(5, 1000, (4, 7), generator=torch.Generator().manual_seed(0))

    with torch.inference_mode():
        peft = engine.model(input_ids=ids, adapter_names=[lease.name for lease in leases]).logits
        with engine.gathered.rows([lease.slot for lease in leases]):
            gathered = engine.model(input_ids=ids).logits
        engine.model.set_adapter(leases[1].name)
        alone_peft = engine.model(input_ids=ids[1:2]).logits
        with engine.gathered.rows([leases[1].slot]):
            alone_gathered = engine.model(input_ids=ids[1:2]).logits

    torch.testing.assert_close(gathered, peft, rtol=1e-5, atol=1e-5)
    assert torch.equal(alone_gathered, alone_peft)  # one slot: PEFT's own order of operations
    assert not torch.allclose(peft[0], peft[3], atol=1e-3)  # the adapters do change the answer


def test_adapters_load_swap_and_evict_in_slots_while_a_batch_decodes(tiny_generator, tmp_path):
    # Prepare: the answers each adapter gives alone, from an engine without gathered LoRA (PEFT).
    base = tiny_generator[0]
    for i in range(1, 4):
        save_strong_adapter(base, client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    reference = make_engine(tiny_generator, tmp_path, gathered=False)
    ask = {c: GenerationRequest(c, QUESTION, passages=PASSAGES) for c in ["c1", "c2", "c3"]}
    alone = {c: reference.generate(r).token_ids for c, r in ask.items()}
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=11)  # c1's version 2
    alone["c1v2"] = reference.generate(ask["c1"]).token_ids
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)  # version 3 = version 1's weights
    assert len({tuple(t) for t in alone.values()}) == 4
    assert all(len(set(tokens)) > 2 for tokens in alone.values())  # not one token repeated

    # Execute: two slots' worth of cache; adapters arrive, change and leave mid-decoding.
    engine = make_engine(tiny_generator, tmp_path, cache_size=2)
    batch = engine.new_batch()
    c1 = engine.prepare(ask["c1"])  # version 3
    batch.add([c1.row])
    batch.step()
    c2 = engine.prepare(ask["c2"])  # loaded into a slot while c1 is mid-answer
    batch.add([c2.row])
    batch.step()
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=11)  # version 4 lands
    c1_new = engine.prepare(ask["c1"])  # a third slot: the held version 3 keeps its own
    batch.add([c1_new.row])
    assert len({c1.row.slot, c2.row.slot, c1_new.row.slot}) == 3
    while len(batch):
        batch.step()
    results = {name: engine.finish(job) for name, job in [("c1", c1), ("c2", c2), ("c1v2", c1_new)]}
    # Everything released: over the count of 2, the least recently used (c1 v3, superseded) left.
    freed = c1.row.slot
    assert freed not in [engine.adapters._current[k].slot for k in engine.adapters._current]
    c3 = engine.prepare(ask["c3"])  # loading c3 evicts c2; one of the freed slots is reused
    assert c3.row.slot in {freed, c2.row.slot}
    batch.add([c3.row])
    while len(batch):
        batch.step()
    results["c3"] = engine.finish(c3)

    # Assert: every row got the tokens its own adapter version gives alone under PEFT.
    assert {name: r.token_ids for name, r in results.items()} == alone
    assert [r.adapter.version for r in results.values()] == [3, 1, 4, 1]
    assert len(engine.adapters.loaded()) == 2


@pytest.mark.parametrize("rank", [4, 16])
def test_adapter_of_another_rank_takes_a_slot_too(tiny_generator, tmp_path, rank):
    base = tiny_generator[0]
    cfg = AdapterConfig(r=rank, alpha=2 * rank)
    from pfi_rag.models.adapters import save_adapter
    from pfi_rag.models.lora import attach_lora

    model = attach_lora(copy.deepcopy(base), cfg, seed=3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(3)) * 0.5)
    save_adapter(model, client_adapter_dir(tmp_path, "odd"))
    save_strong_adapter(base, client_adapter_dir(tmp_path, "c1"), seed=1)
    request = GenerationRequest("odd", QUESTION, passages=PASSAGES)
    expected = make_engine(tiny_generator, tmp_path, gathered=False).generate(request).token_ids

    engine = make_engine(tiny_generator, tmp_path)
    results = engine.generate_together([request, GenerationRequest("c1", QUESTION, passages=PASSAGES)])
    assert results[0].token_ids == expected
    assert engine.gathered.rank == max(rank, 8)


def test_preallocated_cache_gives_dynamic_cache_logits_across_reallocations(tiny_generator):
    from transformers.cache_utils import DynamicCache

    from pfi_rag.models.kv_cache import PreallocatedLayer, preallocated_cache

    model = tiny_generator[0]
    ids = torch.randint(5, 1000, (2, 5), generator=torch.Generator().manual_seed(0))
    caches = {
        "dynamic": DynamicCache(config=model.config),
        "preallocated": preallocated_cache(model.config, headroom=4),
    }
    logits = {}
    with torch.inference_mode():
        for name, cache in caches.items():
            steps, token = [], ids
            for _ in range(12):  # past 4 positions of headroom twice: two reallocations on the way
                out = model(input_ids=token, past_key_values=cache, use_cache=True)
                steps.append(out.logits[:, -1])
                token = out.logits[:, -1:].argmax(-1)
            logits[name] = torch.stack(steps)
    layer = caches["preallocated"].layers[0]
    assert isinstance(layer, PreallocatedLayer) and layer.get_seq_length() == 5 + 11
    assert layer._buffers["keys"].shape[-2] > layer.get_seq_length()  # room left: no copy per step
    torch.testing.assert_close(logits["preallocated"], logits["dynamic"], rtol=1e-5, atol=1e-5)


def test_generating_together_refused_by_one_request_releases_the_adapters_it_pinned(tiny_generator, tmp_path):
    from pfi_rag.models.generation import InvalidRequest

    save_strong_adapter(tiny_generator[0], client_adapter_dir(tmp_path, "c1"), seed=1)
    engine = make_engine(tiny_generator, tmp_path)
    too_long = GenerationRequest("c1", QUESTION, passages=PASSAGES, max_new_tokens=10**6)
    with pytest.raises(InvalidRequest, match="max_new_tokens"):
        engine.generate_together([GenerationRequest("c1", QUESTION, passages=PASSAGES), too_long])
    assert [entry.users for entry in engine.adapters._loaded.values()] == [0]  # c1 loaded, not pinned
