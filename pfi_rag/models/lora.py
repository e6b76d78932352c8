"""Attach a LoRA adapter to the base model, and read or write its weights as plain arrays.

Arrays (name -> numpy) are the currency between training, the federation and serving: they
are what an update carries and what an aggregate is made of.
"""

from __future__ import annotations

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

from pfi_rag.config import AdapterConfig

DEFAULT_ADAPTER = "default"


def lora_config(cfg: AdapterConfig) -> LoraConfig:
    return LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        bias="none",
        task_type="CAUSAL_LM",
    )


def attach_lora(model, cfg: AdapterConfig, *, seed: int = 0) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter; the seed fixes its random A matrices."""
    torch.manual_seed(seed)
    return get_peft_model(model, lora_config(cfg))


def lora_arrays(model: PeftModel, adapter_name: str = DEFAULT_ADAPTER) -> dict[str, np.ndarray]:
    """The adapter's weights, keyed as PEFT saves them (``...lora_A.weight``), as float32 numpy."""
    state = get_peft_model_state_dict(model, adapter_name=adapter_name)
    return {name: tensor.detach().to("cpu", torch.float32).numpy().copy() for name, tensor in state.items()}


def load_lora_arrays(
    model: PeftModel, arrays: dict[str, np.ndarray], adapter_name: str = DEFAULT_ADAPTER
) -> None:
    """Overwrite (some of) the adapter's weights; names not in ``arrays`` keep their values."""
    current = get_peft_model_state_dict(model, adapter_name=adapter_name)
    unknown = set(arrays) - set(current)
    if unknown:
        raise KeyError(f"not weights of adapter {adapter_name!r}: {sorted(unknown)[:3]}")
    merged = dict(current)
    for name, array in arrays.items():
        reference = current[name]
        if tuple(array.shape) != tuple(reference.shape):
            raise ValueError(f"{name}: shape {array.shape} does not match {tuple(reference.shape)}")
        merged[name] = torch.as_tensor(array, dtype=reference.dtype, device=reference.device)
    set_peft_model_state_dict(model, merged, adapter_name=adapter_name)


def is_lora_a(name: str) -> bool:
    return ".lora_A." in name


def is_lora_b(name: str) -> bool:
    return ".lora_B." in name
