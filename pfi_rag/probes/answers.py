"""Answers the client's model gives from retrieved passages (the groundedness probe's default).

The prompt is serving's own (:func:`pfi_rag.models.prompting.build_prompt`): the same system
prompt, citing instruction, relevance floor and prompt-token limit, so the probe judges the
answers a user of the HTTP service would get, from the passages that would reach the model.
"""

from __future__ import annotations

from collections.abc import Sequence

from pfi_rag.models.prompting import Prompt, UsedPassage, build_prompt, relevant
from pfi_rag.probes.context import ProbeContext, SearchHit
from pfi_rag.probes.lm import greedy_answers


def served_passages(ctx: ProbeContext, hits: Sequence[SearchHit]) -> list[SearchHit]:
    """The hits serving would put before the model: those at or above ``retrieval.relevance_floor``."""
    return relevant(hits, ctx.config.retrieval.relevance_floor)


def answer_prompt(ctx: ProbeContext, question: str, hits: Sequence[SearchHit]) -> Prompt:
    """Serving's prompt for ``question`` grounded on ``hits`` (its ``passages`` are those kept)."""
    serving = ctx.config.serving
    return build_prompt(
        ctx.tokenizer,
        messages=[{"role": "user", "content": question}],
        passages=hits,
        system_prompt=serving.system_prompt,
        max_prompt_tokens=serving.max_prompt_tokens,
        relevance_floor=ctx.config.retrieval.relevance_floor,
    )


def model_answers(
    ctx: ProbeContext, client_id: str, questions: list[str], hits: list[list[SearchHit]]
) -> tuple[list[str], list[list[UsedPassage]]]:
    """The client's model's greedy answers (else the base model's), generated in batches, and
    the passages each answer's prompt held."""
    model = ctx.client_model(client_id) or ctx.base_model()
    prompts = [answer_prompt(ctx, q, h) for q, h in zip(questions, hits, strict=True)]
    answers = greedy_answers(
        model, ctx.tokenizer, [p.text for p in prompts], max_new_tokens=ctx.config.probes.answer_tokens
    )
    return answers, [list(p.passages) for p in prompts]
