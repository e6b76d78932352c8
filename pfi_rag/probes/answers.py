"""Answers the client's model gives from retrieved passages (the groundedness probe's default)."""

from __future__ import annotations

from pfi_rag.probes.context import ProbeContext, SearchHit
from pfi_rag.probes.lm import chat_prompt, greedy_answer, greedy_answers


def answer_prompt(ctx: ProbeContext, question: str, hits: list[SearchHit]) -> str:
    notes = "\n".join(f"[{i}] {h.text}" for i, h in enumerate(hits, start=1))
    return chat_prompt(
        ctx.tokenizer, f"{ctx.config.serving.system_prompt}\n\nNotes:\n{notes}\n\nQuestion: {question}"
    )


def model_answerer(ctx: ProbeContext):
    """The default answerer: the client's model (else the base) answers from the hits, greedily."""

    def answer(client_id: str, question: str, hits: list[SearchHit]) -> str:
        model = ctx.client_model(client_id) or ctx.base_model()
        prompt = answer_prompt(ctx, question, hits)
        return greedy_answer(model, ctx.tokenizer, prompt, max_new_tokens=ctx.config.probes.answer_tokens)

    return answer


def model_answers(
    ctx: ProbeContext, client_id: str, questions: list[str], hits: list[list[SearchHit]]
) -> list[str]:
    """What ``model_answerer`` answers to each question, generated in batches."""
    model = ctx.client_model(client_id) or ctx.base_model()
    prompts = [answer_prompt(ctx, q, h) for q, h in zip(questions, hits, strict=True)]
    return greedy_answers(model, ctx.tokenizer, prompts, max_new_tokens=ctx.config.probes.answer_tokens)
