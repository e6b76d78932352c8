"""Models: loading the base LM and embedder, LoRA adapters, likelihood scoring, and serving.

The serving API is re-exported here, imported on first use so that importing
``pfi_rag.models.loading`` alone does not pull in peft and the serving stack.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AdapterCache": "adapter_cache",
    "AdapterLoadError": "adapter_cache",
    "ServedAdapter": "adapter_cache",
    "BatchScheduler": "batching",
    "SchedulerStopped": "batching",
    "TokenStream": "batching",
    "Engine": "generation",
    "GenerationRequest": "generation",
    "GenerationResult": "generation",
    "InvalidRequest": "generation",
    "PassageLike": "prompting",
    "PromptTooLong": "prompting",
    "UsedPassage": "prompting",
    "build_prompt": "prompting",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pfi_rag.models' has no attribute {name!r}")
    return getattr(importlib.import_module(f"pfi_rag.models.{_EXPORTS[name]}"), name)
