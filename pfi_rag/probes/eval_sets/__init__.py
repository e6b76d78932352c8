"""Evaluation sets that do not depend on any client, shipped with the package.

They serve every deployment, synthetic or not: general text (capability), harmful requests a
safe assistant refuses (refusal, erosion) and counterfactual prompt pairs across demographic
attributes (bias). A data root's own ``shared/`` files, when present, take their place.
"""

from __future__ import annotations

from importlib.resources import as_file, files

from pfi_rag.data.records import CounterfactualPair, EvalText, R, RefusalPrompt, read_jsonl


def _read(name: str, record_type: type[R]) -> list[R]:
    with as_file(files(__name__) / name) as path:
        return read_jsonl(path, record_type)


def general_texts() -> list[EvalText]:
    return _read("general_eval.jsonl", EvalText)


def refusal_prompts() -> list[RefusalPrompt]:
    return _read("refusal_prompts.jsonl", RefusalPrompt)


def counterfactual_pairs() -> list[CounterfactualPair]:
    return _read("counterfactuals.jsonl", CounterfactualPair)
