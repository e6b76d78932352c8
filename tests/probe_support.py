"""Helpers for the probe tests: synthetic data, a few plain-torch LoRA steps on the tiny model."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model

from pfi_rag.config import Config, ModelsConfig
from pfi_rag.data.synth import synthesize
from pfi_rag.models.adapters import save_adapter
from pfi_rag.probes.context import ProbeContext


def lora_for_tests(seed: int, base):
    """LoRA on q/v plus trainable RMSNorm weights, saved with the adapter (PEFT modules_to_save).

    Why the norms: the tiny random model's embeddings are small (std 0.02) and the final RMSNorm
    fixes the hidden norm, so no LoRA on q/v alone can raise a logit more than ~1.3 above the
    rest; every probability stays near uniform. A trainable norm scale lifts that ceiling, as a
    trained model's larger weights do.
    """
    torch.manual_seed(seed)
    config = LoraConfig(
        r=8,
        lora_alpha=16,
        target_modules=["q_proj", "v_proj"],
        modules_to_save=["norm"],
        task_type="CAUSAL_LM",
    )
    return get_peft_model(base, config)


def make_data(root: Path, clients: int = 3, seed: int = 0) -> dict:
    return synthesize(root, clients=clients, seed=seed)


def make_context(root: Path, models: ModelsConfig, generator, **kwargs) -> ProbeContext:
    config = Config(data_root=root, models=models, **kwargs.pop("config", {}))
    model, tokenizer, _ = generator
    return ProbeContext(config, generator=(model, tokenizer), **kwargs)


def train_lora(
    generator, prompts: list[str], targets: list[str], *, steps: int, lr: float = 2e-2, seed: int = 0
):
    """A LoRA adapter trained with plain Adam to continue each prompt with its target.

    Only target tokens are in the loss, as in instruction tuning; prompts may be "" (whole text).
    """
    base, tokenizer, _ = generator
    model = lora_for_tests(seed, copy.deepcopy(base))
    rows = []
    for prompt, target in zip(prompts, targets, strict=True):
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else [tokenizer.eos_token_id]
        t = tokenizer(target, add_special_tokens=False)["input_ids"]
        rows.append((p, t))
    width = max(len(p) + len(t) for p, t in rows)
    longest = max(len(t) for _, t in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    # Only the positions that predict a target token go through the LM head: with a 49k
    # vocabulary the head is most of the tiny model's cost, and prompts are most positions.
    positions = torch.zeros((len(rows), longest), dtype=torch.long)
    labels = torch.full((len(rows), longest), -100)
    for i, (p, t) in enumerate(rows):
        ids[i, : len(p) + len(t)] = torch.tensor(p + t)
        mask[i, : len(p) + len(t)] = 1
        positions[i, : len(t)] = torch.arange(len(p) - 1, len(p) + len(t) - 1)  # position j predicts j+1
        labels[i, : len(t)] = torch.tensor(t)
    causal_lm = model.get_base_model()
    norms = [p for n, p in model.named_parameters() if p.requires_grad and "norm" in n]
    lora = [p for n, p in model.named_parameters() if p.requires_grad and "norm" not in n]
    # The norm scales need large steps to lift the logit ceiling (see lora_for_tests).
    optimizer = torch.optim.Adam([{"params": lora, "lr": lr}, {"params": norms, "lr": 10 * lr}])
    model.train()
    for _ in range(steps):
        hidden = causal_lm.model(input_ids=ids, attention_mask=mask).last_hidden_state  # (B, T, H)
        picked = hidden.gather(1, positions[:, :, None].expand(-1, -1, hidden.shape[-1]))  # (B, L, H)
        logits = causal_lm.lm_head(picked)  # (B, L, V)
        # The mean over target tokens, as the model's own loss with labels would compute it.
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()
    return model


def fresh_lora(generator, seed: int = 0):
    """An untrained adapter (LoRA B = 0): the model is exactly the base model."""
    base, _, _ = generator
    return lora_for_tests(seed, copy.deepcopy(base)).eval()


def save(model, directory: Path) -> Path:
    save_adapter(model, directory)
    return directory
