"""Personalized generation on the tiny random Llama: prompts, adapter resolution, decoding, batching."""

from __future__ import annotations

import copy
import threading
import time

import pytest

from pfi_rag.config import AdapterConfig, ServingConfig
from pfi_rag.models import (
    BatchScheduler,
    Engine,
    GenerationRequest,
    InvalidRequest,
    PromptTooLong,
    SchedulerStopped,
    build_prompt,
)
from pfi_rag.models.adapters import client_adapter_dir, global_adapter_dir
from tests.generation_support import PASSAGES, QUESTION, save_random_adapter

# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture()
def engine_factory(tiny_generator, tmp_path):
    base, tokenizer, _ = tiny_generator

    def make(**serving) -> Engine:
        # The engine wraps the model it is given in place: give it a copy of the session's model.
        return Engine(
            copy.deepcopy(base),
            tokenizer,
            data_root=tmp_path,
            serving=ServingConfig(**{"max_new_tokens": 12, **serving}),
            adapter=AdapterConfig(cache_size=8),
        )

    return make


@pytest.fixture()
def five_adapters(tiny_generator, tmp_path):
    """Clients c1..c4 with their own adapters, a global adapter, and c5 with none."""
    base = tiny_generator[0]
    for i in range(1, 5):
        save_random_adapter(base, client_adapter_dir(tmp_path, f"c{i}"), seed=i)
    save_random_adapter(base, global_adapter_dir(tmp_path), seed=99, round=7)
    return ["c1", "c2", "c3", "c4", "c5"]


# -- the RAG prompt ---------------------------------------------------------------------------------


def test_prompt_numbers_passages_by_rank_and_keeps_system_prompt(tiny_generator):
    tokenizer = tiny_generator[1]
    prompt = build_prompt(
        tokenizer,
        messages=[{"role": "user", "content": QUESTION}],
        passages=PASSAGES,
        system_prompt="Cite notes as [n].",
        max_prompt_tokens=1024,
    )
    assert [(p.number, p.doc_id) for p in prompt.passages] == [(1, "doc-dog"), (2, "doc-tea"), (3, "doc-car")]
    assert "[1] My dog is called Biscuit." in prompt.text and "doc-dog" not in prompt.text  # no ids to echo
    assert prompt.text.index("[1]") < prompt.text.index("[2]") < prompt.text.index(QUESTION)
    assert "Cite notes as [n]." in prompt.text and "SmolLM" not in prompt.text  # no template default
    assert prompt.input_ids == tokenizer(prompt.text, add_special_tokens=False)["input_ids"]
    assert prompt.dropped == 0


def test_prompt_budget_drops_lowest_ranked_passages_never_the_question(tiny_generator):
    tokenizer = tiny_generator[1]

    def build(budget: int, passages=PASSAGES):
        return build_prompt(
            tokenizer,
            messages=[{"role": "user", "content": QUESTION}],
            passages=passages,
            system_prompt="S.",
            max_prompt_tokens=budget,
        )

    full = len(build(4096).input_ids)
    without_last = build(full - 1)  # one token short: the rank-3 passage leaves first
    assert [p.doc_id for p in without_last.passages] == ["doc-dog", "doc-tea"]
    assert without_last.dropped == 1 and len(without_last.input_ids) <= full - 1
    bare = len(build(4096, passages=[]).input_ids)
    only_question = build(bare)
    assert only_question.passages == [] and only_question.dropped == 3 and QUESTION in only_question.text
    with pytest.raises(PromptTooLong, match="serving.max_prompt_tokens"):
        build(bare - 1)


def test_chat_history_is_kept_and_question_is_last(tiny_generator):
    tokenizer = tiny_generator[1]
    messages = [
        {"role": "user", "content": "Hi, I'm Ann."},
        {"role": "assistant", "content": "Hello Ann."},
        {"role": "user", "content": QUESTION},
    ]
    prompt = build_prompt(
        tokenizer, messages=messages, passages=PASSAGES[:1], system_prompt="S.", max_prompt_tokens=1024
    )
    assert prompt.text.index("Hello Ann.") < prompt.text.index("Notes:") < prompt.text.index(QUESTION)


# -- adapters: resolution, hot swap, cache ---------------------------------------------------------


def test_answer_says_which_adapter_served_client_then_global_then_base(
    engine_factory, tiny_generator, tmp_path
):
    base = tiny_generator[0]
    save_random_adapter(base, client_adapter_dir(tmp_path, "alice"), seed=1)
    engine = engine_factory()
    ask = lambda client: engine.generate(GenerationRequest(client, QUESTION, passages=PASSAGES))  # noqa: E731

    base_answer = ask("bob")
    assert base_answer.adapter.as_dict() == {"client": "bob", "kind": "base", "version": None, "round": None}
    save_random_adapter(base, global_adapter_dir(tmp_path), seed=2, round=4)
    global_answer = ask("bob")
    assert global_answer.adapter.as_dict() == {"client": "bob", "kind": "global", "version": 1, "round": 4}
    own = ask("alice")
    assert (own.adapter.kind, own.adapter.version) == ("client", 1)
    assert len({base_answer.text, global_answer.text, own.text}) == 3
    assert [p.doc_id for p in own.passages] == ["doc-dog", "doc-tea", "doc-car"]
    assert own.prompt_tokens > 0 and own.completion_tokens == len(own.token_ids) <= 12


def test_newer_adapter_is_swapped_in_while_holders_of_the_old_one_keep_it(
    engine_factory, tiny_generator, tmp_path
):
    base = tiny_generator[0]
    directory = client_adapter_dir(tmp_path, "alice")
    save_random_adapter(base, directory, seed=1)
    engine = engine_factory()
    request = GenerationRequest("alice", QUESTION, passages=PASSAGES)
    first = engine.generate(request)

    held = engine.adapters.acquire("alice")  # an in-flight request on version 1
    save_random_adapter(base, directory, seed=2)
    second = engine.generate(request)
    assert (first.adapter.version, held.served.version, second.adapter.version) == (1, 1, 2)
    assert second.text != first.text
    assert len(engine.adapters.loaded()) == 2  # v1 stays while held
    held.release()
    assert len(engine.adapters.loaded()) == 1 and "--v2--" in engine.adapters.loaded()[0]


def test_hot_swap_under_load_never_mixes_versions(engine_factory, tiny_generator, tmp_path):
    base = tiny_generator[0]
    directory = client_adapter_dir(tmp_path, "alice")
    engine = engine_factory(max_new_tokens=6)
    request = GenerationRequest("alice", QUESTION, passages=PASSAGES)
    expected = {}
    for seed in (1, 2):  # odd versions hold seed 1's weights, even versions seed 2's
        save_random_adapter(base, directory, seed=seed)
        expected[seed] = engine.generate(request).text
    assert expected[1] != expected[2]

    done = threading.Event()

    def writer() -> None:
        for version in range(3, 13):
            save_random_adapter(base, directory, seed=1 if version % 2 else 2)
        done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    served = []
    deadline = time.monotonic() + 600
    while (not done.is_set() or len(served) < 3) and time.monotonic() < deadline:
        result = engine.generate(request)
        served.append(result.adapter.version)
        assert result.text == expected[1 if result.adapter.version % 2 else 2]
    thread.join(timeout=60)
    assert done.is_set(), "the writer did not finish saving its adapter versions"
    last = engine.generate(request)
    assert (last.adapter.version, last.text) == (12, expected[2])
    assert len(set(served)) > 1


def test_cache_evicts_least_recently_used_by_count_and_memory(
    engine_factory, five_adapters, tiny_generator, tmp_path
):
    base, tokenizer, _ = tiny_generator
    engine = Engine(copy.deepcopy(base), tokenizer, data_root=tmp_path, adapter=AdapterConfig(cache_size=2))
    for client in ["c1", "c2", "c1", "c3"]:
        engine.adapters.acquire(client).release()
    assert [name.split("--")[1] for name in engine.adapters.loaded()] == ["c1", "c3"]  # c2 was least recent

    one_adapter_mb = engine.adapters._loaded[engine.adapters.loaded()[0]].nbytes / 2**20
    small = Engine(
        copy.deepcopy(base),
        tokenizer,
        data_root=tmp_path,
        adapter=AdapterConfig(cache_size=8, cache_max_mb=one_adapter_mb * 1.5),
    )
    first, second = small.adapters.acquire("c1"), small.adapters.acquire("c2")
    assert len(small.adapters.loaded()) == 2  # over the memory budget, but both are in use
    first.release()  # c1 is free and least recently used: it goes
    assert [name.split("--")[1] for name in small.adapters.loaded()] == ["c2"]
    second.release()  # within budget again: c2 stays cached
    assert [name.split("--")[1] for name in small.adapters.loaded()] == ["c2"]


# -- decoding ---------------------------------------------------------------------------------------


def test_sampling_is_reproducible_with_a_seed_and_stop_strings_cut(engine_factory):
    engine = engine_factory(max_new_tokens=16)
    sample = lambda seed: engine.generate(  # noqa: E731
        GenerationRequest("bob", QUESTION, passages=PASSAGES, temperature=1.0, top_p=0.9, top_k=50, seed=seed)
    )
    assert sample(1).text == sample(1).text
    assert sample(1).token_ids != sample(2).token_ids

    greedy = engine.generate(GenerationRequest("bob", QUESTION, passages=PASSAGES))
    assert greedy.finish_reason == "length" and greedy.completion_tokens == 16
    for temperature, top_p in [(1e-30, 1.0), (1.0, 1e-9)]:  # limits of sampling are greedy, not NaN
        near = GenerationRequest("bob", QUESTION, passages=PASSAGES, temperature=temperature, top_p=top_p)
        assert engine.generate(near).token_ids == greedy.token_ids
    stop = greedy.text[4:7]
    cut = engine.generate(GenerationRequest("bob", QUESTION, passages=PASSAGES, stop=[stop]))
    assert cut.text == greedy.text[: greedy.text.index(stop)]
    assert cut.finish_reason == "stop"


def test_stream_yields_the_same_text_as_generate(engine_factory, five_adapters):
    engine = engine_factory(max_new_tokens=16)
    request = GenerationRequest("c1", QUESTION, passages=PASSAGES, stop=["zzz-never"])
    pieces = list(engine.stream(request))
    assert len(pieces) > 1 and "".join(pieces) == engine.generate(request).text


def test_bad_requests_are_refused_with_the_field_named(engine_factory):
    engine = engine_factory(max_new_tokens=12, max_prompt_tokens=64)
    with pytest.raises(InvalidRequest, match="serving.max_new_tokens"):
        engine.generate(GenerationRequest("bob", QUESTION, max_new_tokens=13))
    with pytest.raises(PromptTooLong, match="serving.max_prompt_tokens"):
        engine.generate(GenerationRequest("bob", "why " * 200, passages=PASSAGES))
    for bad in [
        dict(client_id="../etc", question="q"),
        dict(client_id="bob"),
        dict(client_id="bob", question="q", temperature=-1),
        dict(client_id="bob", question="q", top_p=0),
        dict(client_id="bob", question="q", stop="x"),
        dict(client_id="bob", messages=[{"role": "assistant", "content": "hi"}]),
    ]:
        with pytest.raises(InvalidRequest):
            GenerationRequest(**bad)


# -- batching ---------------------------------------------------------------------------------------


def test_mixed_adapter_batch_gives_each_row_its_alone_greedy_tokens(engine_factory, five_adapters):
    # Same question for every client: equal-length prompts, so batched rows see no padding and
    # greedy tokens must match exactly (tokens are compared on equal-length prompts).
    engine = engine_factory(max_new_tokens=12)
    requests = [GenerationRequest(client, QUESTION, passages=PASSAGES) for client in five_adapters]
    alone = [engine.generate(request) for request in requests]
    assert len({r.adapter.kind for r in alone}) == 2 and len({tuple(r.token_ids) for r in alone}) == 5

    with BatchScheduler(engine, max_batch_size=5, max_wait_ms=5000) as scheduler:
        futures = [scheduler.submit(request) for request in requests]
        batched = [future.result() for future in futures]
    assert scheduler.max_rows_seen == 5  # all five in one forward pass
    assert [r.token_ids for r in batched] == [r.token_ids for r in alone]
    assert [r.adapter for r in batched] == [r.adapter for r in alone]


def test_rows_joining_a_running_batch_with_padding_keep_their_greedy_tokens(engine_factory, five_adapters):
    # Different prompt lengths (left padding) and rows joining mid-flight. Padding changes the
    # float summation order, so only logits within tolerance are promised here; on the tiny
    # model the greedy tokens agree, and a change would show up in this test.
    engine = engine_factory(max_new_tokens=12)
    requests = [
        GenerationRequest(client, QUESTION + " Please" * i, passages=PASSAGES[: 1 + i % 3])
        for i, client in enumerate(five_adapters)
    ]
    alone = [engine.generate(request).token_ids for request in requests]
    batch = engine.new_batch()
    jobs = [engine.prepare(request) for request in requests]
    batch.add([jobs[0].row, jobs[1].row])
    batch.step()
    batch.add([jobs[2].row])
    batch.step()
    batch.add([jobs[3].row, jobs[4].row])
    while len(batch):
        batch.step()
    assert [engine.finish(job).token_ids for job in jobs] == alone


def test_scheduler_streams_admits_late_requests_and_refuses_when_stopped(engine_factory, five_adapters):
    engine = engine_factory(max_new_tokens=12)
    scheduler = BatchScheduler(engine, max_batch_size=4, max_wait_ms=0)
    with pytest.raises(SchedulerStopped):
        scheduler.submit(GenerationRequest("c1", QUESTION))
    request = GenerationRequest("c2", QUESTION, passages=PASSAGES)
    with scheduler:
        stream = scheduler.submit_stream(request)
        late = scheduler.submit(GenerationRequest("c3", QUESTION, max_new_tokens=2))
        pieces = list(stream)
        assert "".join(pieces) == stream.result().text == engine.generate(request).text
        assert late.result().completion_tokens == 2
    with pytest.raises(SchedulerStopped):
        scheduler.submit(request)
