"""The groundedness probe's answers are the serving engine's: same prompt, adapter and tokens.

The probe decodes many questions together through ``ProbeContext.engine()``; the HTTP service
answers each alone with ``Engine.generate``. Both prefill with SDPA where the lean step decodes.
Prompts of different lengths (left padding) and a passage under the relevance floor, on the tiny
model with a client adapter and a global one.
"""

from __future__ import annotations

from pfi_rag.config import Config
from pfi_rag.layout import client_adapter_dir, global_adapter_dir
from pfi_rag.models.generation import Engine, GenerationRequest
from pfi_rag.probes.answers import served_answers
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.groundedness import GroundednessProbe
from pfi_rag.probes.items import EvalItem
from tests.generation_support import PASSAGES, Passage, save_random_adapter, save_strong_adapter

QUESTIONS = ["What is my dog called?", "When is the car due for a service, and where?", "Who drinks tea?"]
HITS = [PASSAGES, PASSAGES[:1], [*PASSAGES[1:], Passage("doc-x", "Nothing relevant here.", 0.05)]]


def test_probe_answers_are_the_serving_engines_alone(tiny_generator, tiny_models_config, tmp_path):
    # Prepare: alice has her own adapter; bob has none, so the federation's global adapter serves him.
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "alice"), seed=1)
    save_random_adapter(base, global_adapter_dir(tmp_path), seed=9, round=2)
    config = Config(data_root=tmp_path, models=tiny_models_config)
    ctx = ProbeContext(config, generator=(base, tokenizer))
    server = Engine.from_config(config)  # what `pfi-rag serve` builds

    for client, kind in (("alice", "client"), ("bob", "global")):
        # Execute
        probed = served_answers(ctx.engine(), client, QUESTIONS, HITS, max_new_tokens=12)
        alone = [
            server.generate(GenerationRequest(client, question=q, passages=h, max_new_tokens=12))
            for q, h in zip(QUESTIONS, HITS, strict=True)
        ]

        # Assert: row for row the same tokens, text, passages and adapter as one request alone
        assert [r.token_ids for r in probed] == [r.token_ids for r in alone]
        assert [r.text for r in probed] == [r.text for r in alone]
        assert [doc_ids(r) for r in probed] == [doc_ids(r) for r in alone]
        assert {r.adapter.kind for r in probed} == {kind}
        assert all(0 < len(r.token_ids) <= 12 for r in probed)
    # Both prefilled with SDPA ("auto" attention, and the lean step decodes)
    assert ctx.engine().lean is not None and server.lean is not None
    assert ctx.engine().model.config._attn_implementation == "sdpa"
    assert server.model.config._attn_implementation == "sdpa"
    # Passages under retrieval.relevance_floor (0.3) never reach the prompt, ranked by score
    assert [doc_ids(r) for r in probed] == [["doc-dog", "doc-tea"], ["doc-tea"], ["doc-dog"]]


def doc_ids(result) -> list[str]:
    return [p.doc_id for p in result.passages]


class _Store:
    """A retriever over fixed passages (the probe only asks it for the top k of a query)."""

    def search(self, query: str, k: int):
        return PASSAGES[:k]


def test_groundedness_by_default_judges_the_served_answers(tiny_generator, tiny_models_config, tmp_path):
    # Prepare: a client with an adapter and evaluation items; answers come from the engine
    base, tokenizer, _ = tiny_generator
    save_strong_adapter(base, client_adapter_dir(tmp_path, "alice"), seed=1)
    config = Config(data_root=tmp_path, models=tiny_models_config)
    ctx = ProbeContext(config, generator=(base, tokenizer), retriever_factory=lambda client: _Store())
    items = [
        EvalItem("p", " a", (" a", " b"), "doc-dog", f"dog {i}", f"What is my dog called? ({i})", "qa")
        for i in range(10)
    ]
    ctx._items["alice"] = items

    # Execute
    result = GroundednessProbe().run_client(ctx, "alice")

    # Assert: scored on served answers, each judged against the passages its prompt held
    assert result.verdict in (Verdict.PASS, Verdict.FAIL)
    assert result.evidence["adapter"] == ["client"]
    assert result.evidence["answers"] >= 8 and result.evidence["without_passages"] == 0
    low, high = result.evidence["interval"]
    assert 0.0 <= low <= result.value <= high <= 1.0
