"""Evaluation items the utility probes share: planted questions, or cloze items from held-out text.

An item is a prompt, the answer that continues it, distractors of the same kind, the document
that holds the answer and a query a user would search with. Two sources:

- ``qa_items``: the held-out questions a synthetic client carries (planted ground truth);
- ``cloze_items``: label-free items from a client's held-out documents (never trained on): a
  content word of a held-out sentence is masked, the text before it is the prompt, and the
  distractors are other content words of the client's own text. The model's preference among
  the options (likelihood) is a multiple-choice answer with a known truth, so accuracy,
  confidence and the true answer's NLL are all measured without anyone writing a label.

Either way the probes read the same quantities (answer NLL, option probabilities), so a real
client and a synthetic one are judged alike.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from pfi_rag.data.records import Document, QAPair
from pfi_rag.models.scoring import continuation_nll, options_nll
from pfi_rag.probes import precision
from pfi_rag.probes.lm import answer_candidates, option_distribution, qa_prompt
from pfi_rag.probes.metrics import STOPWORDS

CONTEXT_WORDS = 48  # words of the document before the masked word that the prompt keeps
MIN_CONTEXT_WORDS = 4  # fewer and the answer is a guess from nothing
MIN_WORD_CHARS = 4  # content words: letters only, at least this long, not a stopword
_WORD = re.compile(r"[A-Za-z]+(?:'[a-z]+)?")
_SENTENCE_END = re.compile(r"[.!?\n]")


@dataclass(frozen=True)
class EvalItem:
    prompt: str  # the text the answer continues
    answer: str  # the true continuation, with its leading space
    options: tuple[str, ...]  # the answer and its distractors in a fixed shuffled order
    doc_id: str  # the document that states the answer
    query: str  # what a user would search for to find it
    question: str  # what a user would ask (groundedness)
    kind: str  # "qa" (planted) or "cloze" (from a held-out document)

    @property
    def label(self) -> int:
        return self.options.index(self.answer)


def qa_items(qa: Sequence[QAPair], *, choices: int, seed: int) -> list[EvalItem]:
    items = []
    for q in qa:
        options = answer_candidates(q.question, q.answer, count=choices, seed=seed)
        items.append(
            EvalItem(
                prompt=qa_prompt(q.question),
                # A leading space, as the answer follows "Answer:" in text: without it each option is
                # scored as "Answer:Juniper", a tokenization no model saw.
                answer=" " + q.answer,
                options=tuple(" " + o for o in options),
                doc_id=q.doc_id,
                query=q.question,
                question=q.question,
                kind="qa",
            )
        )
    return items


def content_words(text: str) -> list[re.Match]:
    return [
        m
        for m in _WORD.finditer(text)
        if len(m.group()) >= MIN_WORD_CHARS and m.group().lower() not in STOPWORDS and "'" not in m.group()
    ]


def cloze_items(
    held_out: Sequence[Document], vocabulary_from: Sequence[Document], *, count: int, choices: int, seed: int
) -> list[EvalItem]:
    """Up to ``count`` cloze items from ``held_out``, distractors from the words of ``vocabulary_from``.

    Deterministic for the same documents and seed; positions are drawn evenly from all candidate
    words of all held-out documents, so one long document cannot fill the set alone.
    """
    vocabulary = sorted({m.group() for d in vocabulary_from for m in content_words(d.text)})
    candidates = []  # (document, match)
    for doc in held_out:
        for match in content_words(doc.text):
            if len(doc.text[: match.start()].split()) >= MIN_CONTEXT_WORDS:
                candidates.append((doc, match))
    rng = random.Random(f"cloze-{seed}")
    chosen = rng.sample(candidates, k=min(count, len(candidates)))
    chosen.sort(key=lambda c: (c[0].id, c[1].start()))
    items = []
    for doc, match in chosen:
        word = match.group()
        pick = random.Random(f"cloze-{seed}-{doc.id}-{match.start()}")
        # Sample a few more than needed and drop the answer's own forms: no pass over the vocabulary.
        drawn = pick.sample(vocabulary, k=min(len(vocabulary), choices + 2))
        others = [w for w in dict.fromkeys(w for w in drawn if w.lower() != word.lower())][: choices - 1]
        if not others:
            continue
        options = [word, *others]
        pick.shuffle(options)
        before = doc.text[: match.start()].split()
        sentence = _sentence_around(doc.text, match.start(), match.end())
        items.append(
            EvalItem(
                prompt=" ".join(before[-CONTEXT_WORDS:]),
                answer=" " + word,
                options=tuple(" " + o for o in options),
                doc_id=doc.id,
                query=sentence.replace(word, "___", 1) if len(sentence.split()) >= 3 else sentence,
                question=f'Which word fills the blank in "{sentence.replace(word, "___", 1)}"?',
                kind="cloze",
            )
        )
    return items


def _sentence_around(text: str, start: int, end: int) -> str:
    ends = [m.end() for m in _SENTENCE_END.finditer(text, 0, start)]
    left = ends[-1] if ends else 0
    following = _SENTENCE_END.search(text, end)
    right = following.end() if following else len(text)
    return " ".join(text[left:right].split())


@dataclass(frozen=True)
class ItemScores:
    """A model's scores of a list of items: per item, each option's (summed NLL, tokens)."""

    rows: tuple[tuple[tuple[float, int], ...], ...]
    labels: tuple[int, ...]  # the true option of each item

    def __len__(self) -> int:
        return len(self.rows)

    def head(self, count: int) -> ItemScores:
        return self if count >= len(self) else ItemScores(self.rows[:count], self.labels[:count])

    def extended(self, more: ItemScores) -> ItemScores:
        return ItemScores(self.rows + more.rows, self.labels + more.labels)

    def answers(self) -> tuple[np.ndarray, np.ndarray]:
        """(summed NLL, tokens) of each item's true answer."""
        picked = [row[label] for row, label in zip(self.rows, self.labels, strict=True)]
        return np.array([nll for nll, _ in picked]), np.array([n for _, n in picked], dtype=float)

    def answer_nll(self) -> float:
        """Mean per-token NLL (nats) of the true answers (lower is better)."""
        nll, tokens = self.answers()
        return float(nll.sum() / tokens.sum())

    def probs(self) -> np.ndarray:
        """(N, K) probabilities over each item's options, zero-padded; by mean log-likelihood per
        token (summed scores favour short options)."""
        width = max(len(r) for r in self.rows)
        padded = np.zeros((len(self.rows), width))
        for i, row in enumerate(self.rows):
            padded[i, : len(row)] = option_distribution(row, per_token=True)
        return padded


def score_items(
    model, tokenizer, items: Sequence[EvalItem], *, prefix: Sequence[str] | None = None
) -> ItemScores:
    """Every option of every item under ``model``, many items per forward pass.

    ``prefix`` puts context before each prompt (retrieved passages).
    """
    if prefix is None:
        prompts = [i.prompt for i in items]
    else:
        prompts = [f"{p}\n\n{i.prompt}" for i, p in zip(items, prefix, strict=True)]
    rows = options_nll(model, tokenizer, prompts, [list(i.options) for i in items])
    return ItemScores(tuple(tuple(r) for r in rows), tuple(i.label for i in items))


def answer_nll(model, tokenizer, items: Sequence[EvalItem]) -> float:
    """Mean per-token NLL (nats) of the true answers (lower is better)."""
    scored = continuation_nll(model, tokenizer, [i.prompt for i in items], [i.answer for i in items])
    return sum(n for n, _ in scored) / sum(t for _, t in scored)


def choice_probs(model, tokenizer, items: Sequence[EvalItem], *, prefix: Sequence[str] | None = None):
    """(probabilities over each item's options (N, K) zero-padded, true-option index per item)."""
    scores = score_items(model, tokenizer, items, prefix=prefix)
    return scores.probs(), np.array(scores.labels)


def nll_gain(
    ctx, client_id: str, before: str, after: str, *, threshold: float | None
) -> precision.Interval | None:
    """NLL_before - NLL_after (nats per answer token) on a sample of the client's items, sized
    by precision: ``probes.items_first_sample`` items, doubled until the 95% interval's
    half-width is at most ``probes.nll_precision`` or it is clear of ``threshold``. ``before``
    and ``after`` are model keys (ProbeContext.model); None when either model is missing."""
    cfg = ctx.config.probes

    def interval_of(n: int) -> precision.Interval:
        nll_before, tokens = ctx.item_scores(before, client_id, n).answers()
        nll_after, _ = ctx.item_scores(after, client_id, n).answers()
        return precision.ratio(nll_before - nll_after, tokens)

    if ctx.model(before) is None or ctx.model(after) is None:
        return None
    return precision.sample_until(
        interval_of,
        available=len(ctx.eval_items(client_id)),
        first=cfg.items_first_sample,
        half_width=cfg.nll_precision,
        threshold=threshold if cfg.stop_when_decided else None,
    )
