"""What reaches the prompt and how answers read: the relevance floor, repetition control."""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch

from pfi_rag.config import AdapterConfig, RetrievalConfig, ServingConfig
from pfi_rag.data.records import Document
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.sampling import repeated_ngram_tokens, repetition_adjusted
from pfi_rag.retriever import ClientStore
from tests.generation_support import PASSAGES, QUESTION, Passage

# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_engine(tiny_generator, root, **kwargs) -> Engine:
    base, tokenizer, _ = tiny_generator
    serving = ServingConfig(max_new_tokens=10, **kwargs.pop("serving", {}))
    adapter = AdapterConfig()
    return Engine(copy.deepcopy(base), tokenizer, data_root=root, serving=serving, adapter=adapter, **kwargs)


def test_passages_under_the_relevance_floor_never_reach_the_prompt(tiny_generator, tmp_path):
    engine = make_engine(tiny_generator, tmp_path, relevance_floor=0.3)
    # Scores 0.93 (dog), 0.41 (tea), 0.12 (car): the car note is under the floor.
    some = engine.generate(GenerationRequest("bob", QUESTION, passages=PASSAGES))
    off_topic = [Passage("doc-code", "The door code is 4921.", 0.21), Passage("doc-car", "The car.", 0.12)]
    none = engine.generate(GenerationRequest("bob", "Tell me a joke.", passages=off_topic))
    job = engine.prepare(GenerationRequest("bob", "Tell me a joke.", passages=off_topic))
    job.lease.release()

    assert [p.doc_id for p in some.passages] == ["doc-dog", "doc-tea"] and some.passages_below_floor == 1
    assert none.passages == [] and none.passages_below_floor == 2
    assert none.as_dict()["passages"] == [] and none.as_dict()["passages_below_floor"] == 2
    assert "4921" not in job.prompt.text and "Notes: none found." in job.prompt.text


def test_an_unrelated_question_gets_no_passage_from_a_real_store(tiny_generator, embedder, tmp_path):
    # Real all-MiniLM embeddings and FAISS, the configured floor: the client's door code is its
    # nearest note for any question, but an unrelated question is not near enough to get it.
    cfg = RetrievalConfig()
    with ClientStore.open(tmp_path, "alice", cfg, embedder) as store:
        store.add_documents([
            Document(id="door", text="The door code of my flat is 4921."),
            Document(id="dog", text="My dog is called Biscuit and loves the park."),
        ])  # fmt: skip
        search = lambda _client, question: store.search(question, 2)  # noqa: E731
        engine = make_engine(tiny_generator, tmp_path, relevance_floor=cfg.relevance_floor, retrieve=search)
        unrelated = engine.generate(GenerationRequest("alice", "Write a short poem about the sea."))
        related = engine.generate(GenerationRequest("alice", "What is my dog called?"))

    assert unrelated.passages == [] and unrelated.passages_below_floor == 2
    assert [p.doc_id for p in related.passages] == ["dog"]  # the door code stays out here too


def test_repeated_ngrams_are_found_by_hand():
    # generated: a b c a b -> the 3-gram "a b c" exists, the last two tokens are "a b": ban c.
    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 3) == [3]
    assert repeated_ngram_tokens([1, 2, 3, 1, 2], 4) == []  # "3 1 2" has no earlier match
    assert sorted(repeated_ngram_tokens([5, 5, 5], 2)) == [5, 5]  # "5 5" seen twice
    assert repeated_ngram_tokens([1, 2], 3) == []  # too short to repeat anything


def test_repetition_penalty_and_ngram_block_change_only_their_rows():
    class Row:
        def __init__(self, token_ids, **params):
            self.token_ids = token_ids
            self.params = type("P", (), {"repetition_penalty": 1.0, "no_repeat_ngram": 0, **params})()

    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5], [2.0, -2.0, 1.0, 0.5]])
    rows = [Row([0, 1, 0], repetition_penalty=2.0, no_repeat_ngram=2), Row([0, 1, 0])]

    out = repetition_adjusted(rows, logits)

    # Row 0: tokens 0 and 1 were generated: 2.0 / 2 -> 1.0 and -2.0 * 2 -> -4.0; the 2-gram "0 1"
    # exists and the last token is 0, so token 1 is banned outright.
    assert out[0].tolist() == [1.0, float("-inf"), 1.0, 0.5]
    assert out[1].tolist() == logits[1].tolist()  # no settings: untouched
    assert logits[0].tolist() == [2.0, -2.0, 1.0, 0.5]  # the input is not modified


def test_ngram_block_breaks_the_tiny_models_loop(tiny_generator, tmp_path):
    request = GenerationRequest("bob", QUESTION, passages=PASSAGES)
    off = {"no_repeat_ngram": 0, "repetition_penalty": 1.0}
    looping = make_engine(tiny_generator, tmp_path, serving=off).generate(request)
    blocked = make_engine(tiny_generator, tmp_path, serving={**off, "no_repeat_ngram": 2}).generate(request)
    default = make_engine(tiny_generator, tmp_path).generate(request)  # repetition_penalty 1.1, 4-grams
    bigrams = Counter(zip(blocked.token_ids, blocked.token_ids[1:], strict=False))
    assert len(set(looping.token_ids)) == 1  # the tiny random model repeats one token
    assert len(blocked.token_ids) == 10 and max(bigrams.values()) == 1
    assert len(set(default.token_ids)) > 1
