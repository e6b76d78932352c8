"""Serve-time probes: cheap checks run on every answer before it leaves the server.

- grounding: share of the answer's content words found in the passages it cites (all passages
  when it cites none), :func:`pfi_rag.probes.metrics.support`;
- retrieval confidence: the best passage's cosine score (None without passages);
- cross-client copies: word n-grams of the answer found in another client's documents but not
  in this client's documents or prompt (copying one's own documents is the point of RAG);
- PII: 6-digit secrets (the canary format), emails and phone numbers in the answer that come
  from neither the prompt nor the client's own documents (memorised or leaked);
- divergence (optional, ``probes.serve_divergence``): KL(adapter || base) per generated token.

Cost: the copy check hashes the answer's n-grams and binary-searches each other client's sorted
hash array (O(answer words x clients x log n)); the rest is linear regexes and set lookups.
What is known about stored text lives in :mod:`pfi_rag.api.textindex`.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from pfi_rag.api.textindex import PII_PATTERNS, TextIndex, ngram_hashes, pii_in
from pfi_rag.config import ProbesConfig
from pfi_rag.probes.metrics import support

__all__ = ["PII_PATTERNS", "ProbeReport", "ServeProbes", "TextIndex", "ngram_hashes", "pii_in"]

logger = logging.getLogger(__name__)

CITATION = re.compile(r"\[(\d+)\]")


@dataclass
class ProbeReport:
    grounding: float | None
    retrieval_confidence: float | None
    cited: list[int]
    cross_client_spans: int
    pii: list[dict[str, str]]  # kind and origin of PII not found in the prompt (never the value)
    divergence: float | None
    flags: list[str] = field(default_factory=list)
    elapsed_ms: float = 0.0

    @property
    def flagged(self) -> bool:
        return bool(self.flags)

    def as_dict(self) -> dict[str, Any]:
        return {
            "flagged": self.flagged,
            "flags": self.flags,
            "grounding": self.grounding,
            "retrieval_confidence": self.retrieval_confidence,
            "cited": self.cited,
            "cross_client_spans": self.cross_client_spans,
            "pii": self.pii,
            "divergence": self.divergence,
            "elapsed_ms": self.elapsed_ms,
        }


class ServeProbes:
    """Runs the serve-time probes on one answer; ``engine`` is needed only for divergence."""

    def __init__(self, cfg: ProbesConfig, texts: TextIndex, engine=None):
        self.cfg = cfg
        self.texts = texts
        self.engine = engine

    def run(self, client_id: str, question: str, result) -> ProbeReport:
        start = time.perf_counter()
        text, passages = result.text, result.passages
        numbers = {p.number for p in passages}
        cited = sorted({int(n) for n in CITATION.findall(text)} & numbers)
        context_passages = [p for p in passages if p.number in cited] or passages
        grounding = support(text, "\n".join(p.text for p in context_passages)) if passages else None
        confidence = max((p.score for p in passages), default=None)
        prompt = question + "\n" + "\n".join(p.text for p in passages)
        copied = self.texts.copied_spans(client_id, text, prompt)
        prompt_pii = pii_in(prompt)
        pii = [
            {"kind": kind, "origin": self.texts.pii_origin(client_id, (kind, value))}
            for kind, value in sorted(pii_in(text) - prompt_pii)
        ]
        divergence = None
        if self.cfg.serve_divergence and self.engine is not None:
            divergence = adapter_divergence(self.engine, client_id, result.token_ids)
        report = ProbeReport(
            grounding=grounding,
            retrieval_confidence=confidence,
            cited=cited,
            cross_client_spans=copied,
            pii=[item for item in pii if item["origin"] != "own"],
            divergence=divergence,
        )
        if grounding is not None and grounding < self.cfg.grounding_min:
            report.flags.append("grounding")
        if confidence is None or confidence < self.cfg.retrieval_confidence_min:
            report.flags.append("retrieval_confidence")
        if copied:
            report.flags.append("cross_client_copy")
        if report.pii:
            report.flags.append("pii")
        if divergence is not None and divergence > self.cfg.serve_divergence_max:
            report.flags.append("divergence")
        report.elapsed_ms = (time.perf_counter() - start) * 1000
        return report


def adapter_divergence(engine, client_id: str, token_ids: Sequence[int]) -> float | None:
    """Mean KL(adapter || base) over the answer's tokens, nats; None when the base model served."""
    import torch

    from pfi_rag.models.decoding import BASE_ADAPTER

    if not token_ids:
        return None
    with engine.adapters.acquire(client_id) as lease:
        if lease.served.kind == "base":
            return None
        device = next(engine.model.parameters()).device
        ids = torch.tensor([list(token_ids)] * 2, device=device)  # (2, T): adapter row, base row
        with engine.lock, torch.inference_mode():
            logits = engine.model(input_ids=ids, adapter_names=[lease.name, BASE_ADAPTER]).logits.float()
    logp = torch.log_softmax(logits[0], dim=-1)  # (T, V)
    logq = torch.log_softmax(logits[1], dim=-1)
    return float((logp.exp() * (logp - logq)).sum(-1).mean())
