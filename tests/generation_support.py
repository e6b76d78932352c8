"""Helpers for the generation and serving tests: a question with passages, random LoRA adapters."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

import torch

from pfi_rag.config import AdapterConfig
from pfi_rag.models.adapters import save_adapter
from pfi_rag.models.lora import attach_lora

QUESTION = "What is my dog called?"


@dataclass(frozen=True)
class Passage:
    doc_id: str
    text: str
    score: float


PASSAGES = [
    Passage("doc-tea", "Bob drinks green tea every morning.", 0.41),
    Passage("doc-dog", "My dog is called Biscuit.", 0.93),
    Passage("doc-car", "The car is due for a service in May.", 0.12),
]


def save_random_adapter(
    base,
    directory: Path,
    *,
    seed: int,
    round: int | None = None,
    rank: int = 8,
    a_scale: float = 0.1,
    b_scale: float = 0.5,
) -> None:
    """A LoRA adapter with random A and B, so its answers differ from the base model's.

    Every weight comes from a local generator: the global RNG (which attach_lora seeds) is also
    drawn by adapter loads in other threads, so it would not make the weights a function of seed.
    """
    model = attach_lora(copy.deepcopy(base), AdapterConfig(r=rank, alpha=2 * rank), seed=seed)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_A" in name or "lora_B" in name:
                scale = b_scale if "lora_B" in name else a_scale
                param.copy_(torch.randn(param.shape, generator=generator) * scale)
    save_adapter(model, directory, round=round, source="federated" if round is not None else "local")


def save_strong_adapter(base, directory: Path, *, seed: int, rank: int = 8) -> None:
    """Large random A and B: on the tiny model, weak adapters only change an answer's first token."""
    save_random_adapter(base, directory, seed=seed, rank=rank, a_scale=0.5, b_scale=2.0)


def engines_by_weight_format(
    base, tokenizer, data_root: Path, formats, *, max_new_tokens: int, decode_step: str = "transformers"
) -> dict:
    """One serving Engine per weight format, each on its own copy of ``base`` (the tiny model:
    2 layers of 7 Linear layers, and the output head). Decoded by transformers' forward unless
    ``decode_step`` says otherwise: the lean step would lay every fp32 format out alike."""
    from pfi_rag.config import ServingConfig
    from pfi_rag.models import Engine
    from pfi_rag.models.quantization import quantize_linear_layers

    engines = {}
    for fmt in formats:
        model = copy.deepcopy(base)
        assert quantize_linear_layers(model, fmt) == (0 if fmt == "none" else 2 * 7 + 1)
        serving = ServingConfig(max_new_tokens=max_new_tokens, decode_step=decode_step)
        engines[fmt] = Engine(model, tokenizer, data_root=data_root, serving=serving)
    return engines


def last_token_logits(engines: dict, request) -> tuple[dict, dict]:
    """Each engine's adapter slot for ``request`` and its logits after the request's whole prompt."""
    slots, logits = {}, {}
    for fmt, engine in engines.items():
        job = engine.prepare(request)
        job.lease.release()
        slots[fmt] = job.row.slot
        with torch.inference_mode(), engine.gathered.rows([job.row.slot]):
            logits[fmt] = engine.model(input_ids=torch.tensor([job.prompt.input_ids])).logits[0, -1]
    return slots, logits
