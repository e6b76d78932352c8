"""Privacy against utility: what the pipeline is worth to each client, at each epsilon.

One clean federation per total epsilon (spent evenly over the rounds; non-private: clipped,
no noise, no budget), then per client, for the base model, the global adapter and the
client's personalized adapter, each without and with the client's own retrieved passages:
held-out answer perplexity and multiple-choice accuracy on the client's planted facts.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Any

import numpy as np

from pfi_rag.benchmark.runs import federate, prepare_run
from pfi_rag.benchmark.scenarios import scenario_named
from pfi_rag.config import Config

PASSAGES = 2  # retrieved per question, as the demo answers


def privacy_overrides(epsilon: float | None, rounds: int) -> dict[str, Any]:
    if epsilon is None:  # the non-private baseline: clipping kept, no noise, no budget
        return {"noise_multiplier": 0.0, "epsilon_max": math.inf}
    return {"epsilon_per_round": epsilon / rounds, "epsilon_max": epsilon * 1.001}


def client_utility(context, client: str, *, model, retrieval: bool, seed: int) -> dict[str, float]:
    """Answer perplexity of the true answers and 4-way multiple-choice accuracy."""
    from pfi_rag.models.scoring import continuation_nll
    from pfi_rag.probes.lm import answer_candidates, option_probs, qa_prompt

    qa = context.client_data(client).qa
    prompts = []
    for q in qa:
        prompt = qa_prompt(q.question)
        if retrieval:
            store = context.retriever(client)
            hits = store.search(q.question, PASSAGES) if store is not None else []
            notes = "\n".join(f"- {hit.text}" for hit in hits)
            prompt = f"Notes:\n{notes}\n\n{prompt}"
        prompts.append(prompt)
    scored = continuation_nll(model, context.tokenizer, prompts, [" " + q.answer for q in qa])
    perplexity = math.exp(sum(n for n, _ in scored) / sum(t for _, t in scored))
    candidates = [answer_candidates(q.question, q.answer, count=4, seed=seed) for q in qa]
    probs = option_probs(
        model, context.tokenizer, prompts, [[" " + c for c in cs] for cs in candidates], per_token=True
    )
    correct = [cs[int(np.argmax(p))] == q.answer for cs, p, q in zip(candidates, probs, qa, strict=True)]
    return {"answer_ppl": perplexity, "accuracy": sum(correct) / len(correct)}


def measure(cfg: Config) -> dict[str, Any]:
    """Mean over clients of each (model, retrieval) cell, and the per-client values."""
    from pfi_rag.probes import ProbeContext

    context = ProbeContext(cfg)
    try:
        cells: dict[str, dict[str, list[float]]] = {}
        per_client: dict[str, dict[str, Any]] = {}
        for client in context.client_ids():
            models = {
                "base": context.base_model(),
                "global": context.global_model(),
                "personalized": context.client_model(client),
            }
            for name, model in models.items():
                if model is None:
                    continue
                for retrieval in (False, True):
                    key = f"{name}{' + retrieval' if retrieval else ''}"
                    value = client_utility(context, client, model=model, retrieval=retrieval, seed=cfg.seed)
                    per_client.setdefault(client, {})[key] = value
                    cell = cells.setdefault(key, {"answer_ppl": [], "accuracy": []})
                    for metric, number in value.items():
                        cell[metric].append(number)
    finally:
        context.close()
    means = {key: {m: statistics.fmean(v) for m, v in cell.items()} for key, cell in cells.items()}
    return {"mean": means, "clients": per_client}


def run_tradeoff(
    base: Config, work: Path, epsilons: tuple[float | None, ...], *, embedder, on_run=None
) -> list[dict[str, Any]]:
    rows = []
    for epsilon in epsilons:
        label = "non-private" if epsilon is None else f"eps{epsilon:g}"
        cfg = base.model_copy(deep=True)
        for key, value in privacy_overrides(epsilon, base.federation.rounds).items():
            setattr(cfg.privacy, key, value)
        root = work / f"tradeoff-{label}"
        cfg, _ = prepare_run(cfg, root, scenario_named("clean"), seed=0, embedder=embedder)
        system = federate(cfg, [])
        rows.append({"epsilon": epsilon, "system": system, **measure(cfg)})
        if on_run is not None:
            on_run(rows[-1])
    return rows
