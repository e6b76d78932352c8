"""Answers the client's system gives from retrieved passages (the groundedness probe's default).

They come from serving's own engine (:meth:`ProbeContext.engine`): the same prompt (system
prompt, citing instruction, relevance floor, prompt-token limit), the same adapter (the
client's, else the federation's, else none), the same greedy decoder with its repetition
controls, so the probe judges the answers a user of the HTTP service would get, from the
passages that would reach the model. Only their first ``probes.answer_tokens`` tokens are
decoded: support is measured on them.
"""

from __future__ import annotations

from collections.abc import Sequence

from pfi_rag.models.generation import Engine, GenerationRequest, GenerationResult
from pfi_rag.models.prompting import relevant
from pfi_rag.probes.context import ProbeContext, SearchHit

# Prompt tokens per group of rows (of similar length) prefilled in one pass and decoded together.
# Each group decodes on its own: one batch of every row would attend, at every step, over the
# longest prompt's width (padding included); on four real-text clients' questions (80-900 prompt
# tokens) separate groups took 0.63x the time of one batch, for the same tokens.
PREFILL_TOKENS = 8192


def served_passages(ctx: ProbeContext, hits: Sequence[SearchHit]) -> list[SearchHit]:
    """The hits serving would put before the model: those at or above ``retrieval.relevance_floor``."""
    return relevant(hits, ctx.config.retrieval.relevance_floor)


def served_answers(
    engine: Engine,
    client_id: str,
    questions: Sequence[str],
    hits: Sequence[Sequence[SearchHit]],
    *,
    max_new_tokens: int,
    prefill_tokens: int = PREFILL_TOKENS,
) -> list[GenerationResult]:
    """What ``engine`` answers to each question (greedy), given its hits, decoded all together.

    The requests are prepared as the HTTP service prepares them, then taken shortest first in
    groups of about ``prefill_tokens`` prompt tokens; a group is prefilled in one pass and
    decoded together, a row leaving as soon as it ends. Each answer is the one
    ``engine.generate`` gives alone (the same greedy tokens; padding only changes float rounding).
    """
    limit = min(max_new_tokens, engine.serving.max_new_tokens)
    jobs = []
    try:
        for question, passages in zip(questions, hits, strict=True):
            request = GenerationRequest(
                client_id, question=question, passages=list(passages), max_new_tokens=limit
            )
            jobs.append(engine.prepare(request))
        groups: list[list] = [[]]
        for job in sorted(jobs, key=lambda j: len(j.row.prompt_ids)):
            if groups[-1] and (len(groups[-1]) + 1) * len(job.row.prompt_ids) > prefill_tokens:
                groups.append([])
            groups[-1].append(job.row)
        for rows in groups:
            batch = engine.new_batch()
            batch.add(rows)
            while len(batch):
                batch.step()
    except BaseException:
        for job in jobs:
            job.lease.release()
        raise
    return [engine.finish(job) for job in jobs]


def model_answers(
    ctx: ProbeContext, client_id: str, questions: list[str], hits: list[list[SearchHit]]
) -> tuple[list[GenerationResult], list[list]]:
    """The served answers to ``questions`` and the passages each answer's prompt held."""
    results = served_answers(
        ctx.engine(), client_id, questions, hits, max_new_tokens=ctx.config.probes.answer_tokens
    )
    return results, [list(r.passages) for r in results]
