"""Privacy against utility: what the pipeline is worth to each client, at each epsilon.

One clean Flower federation per total epsilon (spent evenly over the rounds), then per client,
for the base model, the global adapter and the client's personalized adapter, each without
and with the client's own retrieved passages: held-out answer perplexity and multiple-choice
accuracy on the client's planted facts.

The non-private baseline cannot run on the federation: pfi-rag refuses to let an update that
was not noised leave a client (privacy.update). :func:`train_without_privacy` runs the same
FedAvg rounds in this process instead, with nothing sent anywhere.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from pfi_rag.benchmark.runs import federate, prepare_run
from pfi_rag.benchmark.scenarios import scenario_named
from pfi_rag.config import Config

PASSAGES = 2  # retrieved per question, as the demo answers
NON_PRIVATE_SOURCE = "non-private baseline"  # the adapters' recorded source


def train_without_privacy(cfg: Config) -> dict[str, Any]:
    """FedAvg without clipping or noise, in this process: each round every client trains its
    adapter from the global one (``private=False``), keeps the result as its personalized
    adapter, and the global adapter moves by the record-weighted mean of their changes, as
    the federation's ``fedavg`` does. Adapters are written where the federation writes them.
    Returns the clients' mean training loss before the first round and after the last."""
    from pfi_rag.data.corpus import load_corpus
    from pfi_rag.federation.aggregation import weighted_mean
    from pfi_rag.federation.task import fresh_adapter
    from pfi_rag.layout import client_adapter_dir, global_adapter_dir, list_clients
    from pfi_rag.models.adapters import save_adapter
    from pfi_rag.models.lora import load_lora_arrays, lora_arrays
    from pfi_rag.privacy import train_adapter

    model, tokenizer, _ = fresh_adapter(cfg)
    global_arrays = lora_arrays(model)
    losses: dict[int, list[tuple[float, float]]] = {}
    for round_number in range(1, cfg.federation.rounds + 1):
        deltas, weights = [], []
        for client in list_clients(cfg.data_root):
            # The same training data as the federation's clients: the store minus the held-out share.
            data = load_corpus(cfg.data_root, client, held_out_share=cfg.data.held_out_share)
            load_lora_arrays(model, global_arrays)
            result = train_adapter(
                model,
                tokenizer,
                documents=data.train,
                instructions=data.instructions,
                cfg=cfg.privacy,
                ledger=None,
                seed=cfg.seed * 1000 + round_number,
                private=False,
            )
            trained = lora_arrays(model)
            personal = client_adapter_dir(cfg.data_root, client)
            save_adapter(model, personal, round=round_number, source=NON_PRIVATE_SOURCE)
            deltas.append({name: trained[name] - global_arrays[name] for name in trained})
            weights.append(float(result.records))
            losses.setdefault(round_number, []).append((result.loss_before, result.loss_after))
        mean = weighted_mean(deltas, weights)
        global_arrays = {name: global_arrays[name] + mean[name] for name in global_arrays}
    load_lora_arrays(model, global_arrays)
    rounds = cfg.federation.rounds
    save_adapter(model, global_adapter_dir(cfg.data_root), round=rounds, source=NON_PRIVATE_SOURCE)
    return {
        "mean_loss_start": statistics.fmean(before for before, _ in losses[1]),
        "mean_loss_end": statistics.fmean(after for _, after in losses[rounds]),
        "in_process": True,
    }


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
            # Accessors, called right before scoring: the context keeps one PeftModel and each
            # accessor switches its active adapter, so a model fetched earlier may have changed.
            models = {
                "base": context.base_model,
                "global": context.global_model,
                "personalized": lambda client=client: context.client_model(client),
            }
            for name, fetch in models.items():
                for retrieval in (False, True):
                    model = fetch()
                    if model is None:
                        continue
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
    base: Config,
    work: Path,
    epsilons: tuple[float | None, ...],
    *,
    embedder,
    finished: dict[float | None, dict[str, Any]] | None = None,
    on_run=None,
) -> list[dict[str, Any]]:
    """One row per total epsilon; ``finished`` rows (by epsilon, from an earlier invocation) are
    reused, and ``on_run(row)`` hears each new one."""
    rows = []
    for epsilon in epsilons:
        if finished and epsilon in finished:
            rows.append(finished[epsilon])
            continue
        label = "non-private" if epsilon is None else f"eps{epsilon:g}"
        cfg = base.model_copy(deep=True)
        if epsilon is not None:  # spent evenly over the rounds, the budget set to the total
            cfg.privacy.epsilon_per_round = epsilon / cfg.federation.rounds
            cfg.privacy.epsilon_max = epsilon * 1.001
        root = work / f"tradeoff-{label}"
        cfg, _ = prepare_run(cfg, root, scenario_named("clean"), seed=0, embedder=embedder)
        if epsilon is None:
            system = train_without_privacy(cfg)
        else:
            system = federate(cfg, [])
        measured = time.perf_counter()
        rows.append({"epsilon": epsilon, "system": system, **measure(cfg)})
        rows[-1]["measure_seconds"] = time.perf_counter() - measured
        if on_run is not None:
            on_run(rows[-1])
    return rows
