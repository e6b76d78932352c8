"""Answer quality on the synthetic QA with the default model: citations, exact answers, loops.

    .venv/bin/python bench/answers.py [--questions 20] [--tokens 48] [--json out.json]

Synthetic clients (``pfi-rag data synth``) get their documents indexed in real stores; their
held-out questions are answered with retrieval (top k, relevance floor), each answer decoded
greedily by the serving engine, all questions of a setting in one batch. Settings compared in
the same run, same passages:

- ``before``: the earlier prompt (passages shown with their document ids, no instruction after
  the question) and no repetition control;
- ``prompt``: the current prompt only;
- ``repetition``: the earlier prompt with the current repetition defaults only;
- ``after``: both (today's defaults).

With ``--weights none,int8,int8-dynamic`` the run compares base-weight formats instead
(``serving.weight_format``, pfi_rag/models/quantization.py), each with today's defaults.

Per setting: citation rate (the answer cites some [n] it was given), right citation (it cites
the passage from the document that holds the answer), exact answer (the planted value appears
in the answer), and loops (a word 3-gram repeated three times or more).
"""

from __future__ import annotations

import argparse
import json
import re
import tempfile
import time
from collections import Counter
from pathlib import Path
from unittest import mock

from pfi_rag.config import ModelsConfig, RetrievalConfig, ServingConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.models import Engine, GenerationRequest, prompting
from pfi_rag.models.loading import load_embedder, load_generator
from pfi_rag.models.quantization import quantize_linear_layers
from pfi_rag.retriever import ClientStore

EARLIER_SYSTEM_PROMPT = (
    "You are a helpful personal assistant. Answer from the user's notes below and cite "
    "them as [n]. If the notes do not contain the answer, say so."
)


def earlier_user_turn(question: str, passages) -> str:
    if not passages:
        return f"Notes: none found.\n\nQuestion: {question}"
    notes = "\n".join(f"[{p.number}] ({p.doc_id}) {p.text.strip()}" for p in passages)
    return f"Notes:\n{notes}\n\nQuestion: {question}"


def loops(text: str) -> bool:
    words = re.findall(r"\w+", text.lower())
    grams = Counter(zip(words, words[1:], words[2:], strict=False))
    return bool(grams) and max(grams.values()) >= 3


def score(results, questions) -> dict:
    n = len(results)
    cited = right = exact = looped = 0
    for result, qa in zip(results, questions, strict=True):
        numbers = {int(m) for m in re.findall(r"\[(\d+)\]", result.text)}
        given = {p.number: p.doc_id for p in result.passages}
        cited += bool(numbers & set(given))
        right += any(given.get(m) == qa.doc_id for m in numbers)
        exact += qa.answer.lower() in result.text.lower()
        looped += loops(result.text)
    return {"citation_rate": cited / n, "right_citation_rate": right / n, "exact_answer_rate": exact / n,
            "loop_rate": looped / n}  # fmt: skip


def print_setting(label: str, rates: dict, results, questions, show: int, extra: str = "") -> None:
    """One line of rates for a setting, then its first ``show`` answers."""
    print(
        f"{label:<13} citation {rates['citation_rate']:5.0%}  right citation "
        f"{rates['right_citation_rate']:5.0%}  exact answer {rates['exact_answer_rate']:5.0%}  "
        f"loops {rates['loop_rate']:5.0%}{extra}"
    )
    for result, qa in list(zip(results, questions, strict=True))[:show]:
        print(f"    Q: {qa.question} (answer: {qa.answer}) -> {result.text.strip()[:160]!r}")


def finish(out: dict, args, started: float) -> None:
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2) + "\n")


def compare_weights(args, root: Path, requests, questions, floor: float, started: float) -> None:
    """Today's defaults on each base-weight format, same questions and passages."""
    out = {}
    print(f"{len(requests)} synthetic questions, {args.tokens} new tokens, greedy, relevance floor {floor}")
    reference = None
    for fmt in args.weights.split(","):
        model, tokenizer, _ = load_generator(ModelsConfig())
        quantize_linear_layers(model, fmt)
        serving = ServingConfig(max_new_tokens=args.tokens)  # quantized above (int8-dynamic is not a setting)
        engine = Engine(model, tokenizer, data_root=root, serving=serving, relevance_floor=floor)
        results = engine.generate_together(requests)
        out[fmt] = score(results, questions)
        texts = [r.text for r in results]
        reference = reference or texts
        same = sum(a == b for a, b in zip(texts, reference, strict=True))
        out[fmt]["same_text_as_first"] = same / len(texts)
        first = args.weights.split(",")[0]
        extra = f"  same answer text as {first}: {out[fmt]['same_text_as_first']:5.0%}"
        print_setting(fmt, out[fmt], results, questions, args.show, extra)
    finish(out, args, started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--questions", type=int, default=20)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--show", type=int, default=3, help="Print this many answers per setting.")
    parser.add_argument("--penalty", type=float, help="Repetition penalty to try (default: the config's).")
    parser.add_argument("--ngram", type=int, help="No-repeat n-gram size to try (default: the config's).")
    parser.add_argument("--weights", help="compare these serving.weight_format values (comma-separated)")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="pfi-answers-"))
    synthesize(root, clients=args.clients, seed=0)
    models, retrieval = ModelsConfig(), RetrievalConfig()
    embedder = load_embedder(models)
    questions, requests = [], []
    per_client = -(-args.questions // args.clients)
    for i in range(args.clients):
        client = f"client-{i:02d}"
        data = load_client_data(root, client)
        with ClientStore.open(root, client, retrieval, embedder) as store:
            store.add_documents(data.documents)
            for qa in data.qa[:per_client]:
                hits = store.search(qa.question, retrieval.top_k)
                questions.append(qa)
                request = GenerationRequest(client, qa.question, passages=hits, max_new_tokens=args.tokens)
                requests.append(request)
    questions, requests = questions[: args.questions], requests[: args.questions]
    if args.weights:  # each format loads its own copy of the model
        compare_weights(args, root, requests, questions, retrieval.relevance_floor, started)
        return
    model, tokenizer, _ = load_generator(models)
    engine = Engine(model, tokenizer, data_root=root, relevance_floor=retrieval.relevance_floor)
    now = ServingConfig(max_new_tokens=args.tokens)
    tried = {"repetition_penalty": args.penalty, "no_repeat_ngram": args.ngram}
    now = now.model_copy(update={key: value for key, value in tried.items() if value is not None})
    earlier = {"system_prompt": EARLIER_SYSTEM_PROMPT}
    no_repetition = {"repetition_penalty": 1.0, "no_repeat_ngram": 0}
    settings = {
        "before": (now.model_copy(update={**earlier, **no_repetition}), earlier_user_turn),
        "prompt": (now.model_copy(update=no_repetition), prompting.user_turn),
        "repetition": (now.model_copy(update=earlier), earlier_user_turn),
        "after": (now, prompting.user_turn),
    }
    print(
        f"{len(requests)} synthetic questions from {args.clients} clients, {args.tokens} new tokens, greedy, "
        f"relevance floor {retrieval.relevance_floor}; defaults now: repetition_penalty "
        f"{now.repetition_penalty}, no_repeat_ngram {now.no_repeat_ngram}"
    )
    out = {}
    for name, (serving, turn) in settings.items():
        engine.serving = serving
        with mock.patch.object(prompting, "user_turn", turn):
            results = engine.generate_together(requests)
        out[name] = score(results, questions)
        print_setting(name, out[name], results, questions, args.show)
    finish(out, args, started)


if __name__ == "__main__":
    main()
