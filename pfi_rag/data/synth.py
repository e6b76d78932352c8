"""Synthetic federated personal data with planted ground truth, deterministic from a seed.

Each client is a persona whose facts are stated in its notes, messages and emails. Planted
for the probes: held-out questions answered in the documents, canaries (secrets in a known
format, some repeated), facts that a later dated version supersedes, counterfactual prompt
pairs, and skewed client sizes. Every planted item's ground truth goes to ``manifest.json``,
apart from the documents, so probes and benchmarks can score themselves.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfi_rag import layout
from pfi_rag.data import pools
from pfi_rag.data.records import (
    CounterfactualPair,
    Document,
    EvalText,
    Instruction,
    QAPair,
    RefusalPrompt,
    write_jsonl,
)
from pfi_rag.storage import atomic_write_json

# Planted documents (facts, the versioned fact, canaries) are pinned to the training side of the
# client's held-out split (data/corpus.py): the manifest's ground truth assumes they were trained
# on. Filler documents fall wherever the split puts them.
TRAIN = {"split": "train"}

# Relative size of each client, largest first; beyond the list, sizes keep shrinking.
SIZE_WEIGHTS = [1.0, 0.7, 0.45, 0.12, 0.8, 0.3, 0.08, 0.55]
TINY_WEIGHT = 0.15  # below this a client is "tiny": few facts, no filler, canaries not repeated
MAX_FILLER = 36
CANARY_REPEATS = [1, 8]  # one canary stated once, one repeated (memorisation grows with repeats)


@dataclass(frozen=True)
class Fact:
    attribute: str
    value: str


def client_ids(count: int) -> list[str]:
    return [f"client-{i:02d}" for i in range(count)]


def size_weight(index: int) -> float:
    if index < len(SIZE_WEIGHTS):
        return SIZE_WEIGHTS[index]
    return max(0.05, 0.6 / (1 + index - len(SIZE_WEIGHTS)))


def _unique_value(rng: random.Random, pool: list[str], taken: set[str]) -> str:
    free = [value for value in pool if value not in taken]
    value = rng.choice(free or pool)
    taken.add(value)
    return value


def _document(
    rng: random.Random, doc_id: str, attribute: str, value: str, persona: dict[str, str], date: str
) -> Document:
    spec = pools.ATTRIBUTES[attribute]
    kind = rng.choice(["note", "message", "email"])
    statement = rng.choice(spec["statements"]).format(v=value, **persona)
    if kind == "email":
        greeting, signature = f"Hi {persona['friend']},", f"Best,\n{persona['name']}"
        text = f"Subject: {spec['subject']}\n\n{greeting}\n\n{statement}\n\n{signature}"
    elif kind == "message":
        text = f"Message to {persona['friend']}: {statement}"
    else:
        text = f"Note ({date}): {statement}"
    return Document(
        id=doc_id, text=text, metadata={"kind": kind, "date": date, "attribute": attribute, **TRAIN}
    )


def _date(rng: random.Random, year: int) -> str:
    return f"{year}-{rng.randint(1, 12):02d}-{rng.randint(1, 28):02d}"


def synthesize_client(seed: int, index: int, taken: dict[str, set[str]]) -> dict[str, Any]:
    """Build one client's records and ground truth; ``taken`` keeps values unique across clients."""
    rng = random.Random(f"{seed}-{index}")
    cid = client_ids(index + 1)[index]
    weight = size_weight(index)
    tiny = weight < TINY_WEIGHT
    persona = {
        "name": _unique_value(rng, pools.FIRST_NAMES, taken.setdefault("name", set())),
        "friend": rng.choice(pools.FRIEND_NAMES),
    }
    attributes = list(pools.ATTRIBUTES)
    rng.shuffle(attributes)
    versioned_attribute = "city"
    attributes.remove(versioned_attribute)
    n_facts = 4 if tiny else max(6, round(len(attributes) * min(1.0, 0.5 + weight)))
    facts = [
        Fact(a, _unique_value(rng, pools.ATTRIBUTES[a]["values"], taken.setdefault(a, set())))
        for a in attributes[:n_facts]
    ]

    documents: list[Document] = []
    qa: list[QAPair] = []
    instructions: list[Instruction] = []
    fact_truth = []
    for number, fact in enumerate(facts):
        doc_id = f"{cid}-doc-{number:03d}"
        spec = pools.ATTRIBUTES[fact.attribute]
        documents.append(_document(rng, doc_id, fact.attribute, fact.value, persona, _date(rng, 2025)))
        qa.append(QAPair(question=spec["question"], answer=fact.value, doc_id=doc_id))
        instructions.append(
            Instruction(prompt=spec["train_prompt"], response=spec["train_response"].format(v=fact.value))
        )
        fact_truth.append(
            {"attribute": fact.attribute, "value": fact.value, "doc_id": doc_id, "question": spec["question"]}
        )

    # A fact that changes: the old version is indexed now, the dated update supersedes it later.
    city_pool = pools.ATTRIBUTES[versioned_attribute]["values"]
    old_city = _unique_value(rng, city_pool, taken.setdefault("city", set()))
    new_city = _unique_value(rng, city_pool, taken["city"])
    home_id = f"{cid}-doc-home"
    old_date, new_date = _date(rng, 2024), _date(rng, 2026)
    documents.append(_document(rng, home_id, versioned_attribute, old_city, persona, old_date))
    updates = [
        Document(
            id=home_id,
            text=f"Note ({new_date}): Update: the move is done. I now live in {new_city}, "
            f"no longer in {old_city}.",
            metadata={
                "kind": "note",
                "date": new_date,
                "attribute": versioned_attribute,
                "version": 2,
                **TRAIN,
            },
        )
    ]
    versioned_truth = [
        {
            "doc_id": home_id,
            "attribute": versioned_attribute,
            "old": old_city,
            "new": new_city,
            "old_date": old_date,
            "new_date": new_date,
            "question": pools.ATTRIBUTES[versioned_attribute]["question"],
        }
    ]

    # Canaries: secrets in a known format, never in another client's data.
    canary_truth = []
    repeats_list = [1] if tiny else CANARY_REPEATS
    for number, repeats in enumerate(repeats_list):
        secret = None
        while secret is None or secret in taken.setdefault("canary", set()):
            secret = f"{rng.randrange(10**6):06d}"
        taken["canary"].add(secret)
        prefix = f"{persona['name']}'s {pools.CANARY_KINDS[number]} is "
        doc_ids = []
        for copy in range(repeats):
            doc_id = f"{cid}-canary-{number}-{copy:02d}"
            text = f"{rng.choice(pools.CANARY_CONTEXTS)} {prefix}{secret}."
            documents.append(
                Document(id=doc_id, text=text, metadata={"kind": "note", "date": _date(rng, 2025), **TRAIN})
            )
            doc_ids.append(doc_id)
        canary_truth.append(
            {
                "prefix": prefix,
                "secret": secret,
                "format": r"\d{6}",
                "space_size": 10**6,
                "repeats": repeats,
                "doc_ids": doc_ids,
            }
        )

    n_filler = 0 if tiny else round(MAX_FILLER * weight)
    for number in range(n_filler):
        text = rng.choice(pools.FILLER).format(friend=persona["friend"], day=rng.choice(pools.DAYS))
        documents.append(
            Document(
                id=f"{cid}-filler-{number:03d}",
                text=text,
                metadata={"kind": "note", "date": _date(rng, 2025)},
            )
        )
    rng.shuffle(documents)

    counterfactuals = []
    for template, options in rng.sample(pools.COUNTERFACTUAL_TEMPLATES, k=4):
        for attribute, group_a, group_b in pools.COUNTERFACTUAL_GROUPS:
            counterfactuals.append(
                CounterfactualPair(
                    attribute=attribute,
                    group_a=group_a,
                    group_b=group_b,
                    options=options,
                    prompt_a=template.format(group=group_a),
                    prompt_b=template.format(group=group_b),
                )
            )

    return {
        "client_id": cid,
        "records": {
            "documents": documents,
            "qa": qa,
            "instructions": instructions,
            "updates": updates,
            "counterfactuals": counterfactuals,
        },
        "truth": {
            "persona": persona,
            "size_weight": weight,
            "tiny": tiny,
            "n_documents": len(documents),
            "facts": fact_truth,
            "versioned": versioned_truth,
            "canaries": canary_truth,
        },
    }


def synthesize(out: Path, *, clients: int, seed: int) -> dict[str, Any]:
    """Write ``clients`` clients' data under ``out`` and return the manifest.

    Layout: ``clients/<id>/data/*.jsonl`` (each client's own files), ``shared/*.jsonl``
    (evaluation sets every client holds a copy of) and ``manifest.json`` (ground truth).
    """
    if clients < 1:
        raise ValueError("--clients must be at least 1")
    out = Path(out)
    taken: dict[str, set[str]] = {}
    manifest: dict[str, Any] = {"seed": seed, "clients": {}, "format": 1}
    for index in range(clients):
        built = synthesize_client(seed, index, taken)
        directory = layout.client_data_dir(out, built["client_id"])
        for name, records in built["records"].items():
            write_jsonl(directory / f"{name}.jsonl", records)
        manifest["clients"][built["client_id"]] = built["truth"]
    write_jsonl(layout.general_eval_file(out), [EvalText(text=t) for t in pools.GENERAL_EVAL])
    write_jsonl(
        layout.refusal_prompts_file(out),
        [RefusalPrompt(prompt=p, category=c) for c, p in pools.REFUSAL_PROMPTS],
    )
    atomic_write_json(layout.manifest_file(out), manifest)
    return manifest


def ingest_synthetic(out: Path, clients: list[str], retrieval_cfg, embedder, progress=None) -> dict[str, Any]:
    """Write each synthesised client's documents through its own store, as `pfi-rag ingest` would,
    so a synthetic client's training data comes from where a real one's does. The dated updates
    (updates.jsonl) are left for later: they arrive after indexing, which the staleness probes
    measure. Returns each client's ingest report."""
    from pfi_rag.data.records import load_client_data
    from pfi_rag.retriever import ClientStore

    reports = {}
    for client in clients:
        documents = load_client_data(out, client).documents
        with ClientStore.open(out, client, retrieval_cfg, embedder) as store:
            reports[client] = store.add_documents(documents, source="documents.jsonl", progress=progress)
    return reports
