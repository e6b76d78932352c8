"""Build the RAG prompt: system prompt, numbered passages, the question, in the model's chat template.

Passages are ranked by score and numbered ``[1]..[n]`` so an answer can cite them. When the
prompt does not fit the token budget, the lowest-ranked passages leave first; the question and
the system prompt are never cut: if they alone do not fit, the request is refused.

Any object with ``doc_id``, ``text`` and ``score`` is a passage (the retriever's ``Hit`` is
one), so this module does not import the retriever.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class PassageLike(Protocol):
    doc_id: str
    text: str
    score: float


class PromptTooLong(ValueError):
    """The question (with the system prompt and chat template) exceeds the prompt budget."""


@dataclass(frozen=True)
class UsedPassage:
    """A passage that went into the prompt as ``[number]``."""

    number: int
    doc_id: str
    text: str
    score: float
    chunk_id: int | str | None = None  # the retriever's chunk id, when the passage has one

    def as_dict(self) -> dict[str, Any]:
        return {
            "number": self.number,
            "doc_id": self.doc_id,
            "chunk_id": self.chunk_id,
            "score": self.score,
            "text": self.text,
        }


@dataclass(frozen=True)
class Prompt:
    input_ids: list[int]
    text: str
    passages: list[UsedPassage]  # in prompt order, numbered from 1
    dropped: int  # passages left out to fit the budget
    below_floor: int = 0  # passages left out as not relevant enough (score under the floor)


# After the question, where a small model reads it last: measured on the synthetic QA with
# bench/answers.py (docs/serving.md "Answer quality").
CITE_INSTRUCTION = 'Answer in a few words and cite the note, for example: "... [1]."'
NO_NOTES_INSTRUCTION = "No note answers this: say that you do not know."


def format_passages(passages: Sequence[UsedPassage]) -> str:
    # No document ids: a small model echoes "(client-00-doc-3)" into its answers.
    return "\n".join(f"[{p.number}] {p.text.strip()}" for p in passages)


def user_turn(question: str, passages: Sequence[UsedPassage]) -> str:
    if not passages:
        return f"Notes: none found.\n\nQuestion: {question}\n{NO_NOTES_INSTRUCTION}"
    return f"Notes:\n{format_passages(passages)}\n\nQuestion: {question}\n{CITE_INSTRUCTION}"


def render(tokenizer, messages: list[dict[str, str]]) -> str:
    """The chat template's text with the assistant turn opened; a plain layout if there is none."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    lines = [f"{m['role'].capitalize()}: {m['content']}" for m in messages]
    return "\n\n".join(lines) + "\n\nAssistant:"


def relevant(passages: Sequence[PassageLike], floor: float | None) -> list[PassageLike]:
    """The passages scoring at least ``floor`` (all of them without a floor)."""
    if floor is None:
        return list(passages)
    return [p for p in passages if float(p.score) >= floor]


def rank(passages: Sequence[PassageLike]) -> list[UsedPassage]:
    """Highest score first; ties keep the caller's order (sorted is stable)."""
    ordered = sorted(passages, key=lambda p: -float(p.score))
    return [
        UsedPassage(
            number=i + 1,
            doc_id=str(p.doc_id),
            text=str(p.text),
            score=float(p.score),
            chunk_id=getattr(p, "chunk_id", None),
        )
        for i, p in enumerate(ordered)
    ]


def build_prompt(
    tokenizer,
    *,
    messages: Sequence[dict[str, str]],
    passages: Sequence[PassageLike],
    system_prompt: str,
    max_prompt_tokens: int,
    relevance_floor: float | None = None,
) -> Prompt:
    """The prompt for ``messages`` (the last one is the user's question) grounded on ``passages``.

    Passages scoring under ``relevance_floor`` are left out; of the rest, keeps the largest
    prefix of the ranked passages that fits ``max_prompt_tokens``.
    """
    if not messages or messages[-1].get("role") != "user":
        raise ValueError("messages must end with a 'user' message (the question)")
    history = [dict(m) for m in messages[:-1] if m.get("role") != "system"]
    question = messages[-1]["content"]
    kept_relevant = relevant(passages, relevance_floor)
    below_floor = len(passages) - len(kept_relevant)
    ranked = rank(kept_relevant)

    def encode(kept: list[UsedPassage]) -> tuple[str, list[int]]:
        turns = [{"role": "system", "content": system_prompt}, *history]
        turns.append({"role": "user", "content": user_turn(question, kept)})
        text = render(tokenizer, turns)
        return text, tokenizer(text, add_special_tokens=False)["input_ids"]

    # Try the full set first (the usual case), then shrink from the lowest rank.
    for keep in range(len(ranked), -1, -1):
        text, ids = encode(ranked[:keep])
        if len(ids) <= max_prompt_tokens:
            kept = ranked[:keep]
            return Prompt(ids, text, kept, dropped=len(ranked) - keep, below_floor=below_floor)
    raise PromptTooLong(
        f"the question needs {len(ids)} prompt tokens without any passage, over the limit of "
        f"{max_prompt_tokens} (serving.max_prompt_tokens): shorten the question or raise the limit"
    )
