"""Personalization is real: training one client's adapter changes its answers and lowers its
held-out loss, and leaves every other client's adapter and answers as they were."""

from __future__ import annotations

import copy
import random

import pytest
import torch

from pfi_rag.config import AdapterConfig, ServingConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir, read_adapter_info, save_adapter
from pfi_rag.models.lora import attach_lora
from pfi_rag.models.prompting import build_prompt
from pfi_rag.models.scoring import continuation_nll

SYSTEM = ServingConfig().system_prompt


# One torch thread (tests/conftest.py): on the shared 2-core machine two threads decoded ~5x slower.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def chat_prompt(tokenizer, question: str) -> str:
    return build_prompt(
        tokenizer,
        messages=[{"role": "user", "content": question}],
        passages=[],
        system_prompt=SYSTEM,
        max_prompt_tokens=4096,
    ).text


def train(model, tokenizer, pairs: list[tuple[str, str]], *, steps: int, batch: int = 8, lr: float = 2e-2):
    """Plain (non-private) LoRA training on random minibatches; the loss covers responses only."""
    rng = random.Random(0)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        rows = []
        for prompt, response in rng.sample(pairs, batch):
            prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            target_ids = tokenizer(response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            rows.append((prompt_ids + target_ids, [-100] * len(prompt_ids) + target_ids))
        width = max(len(ids) for ids, _ in rows)
        # Right padding: pad positions are masked out of attention and of the loss.
        input_ids = torch.tensor([ids + [tokenizer.pad_token_id] * (width - len(ids)) for ids, _ in rows])
        labels = torch.tensor([lab + [-100] * (width - len(lab)) for _, lab in rows])
        attention = torch.tensor([[1] * len(ids) + [0] * (width - len(ids)) for ids, _ in rows])
        loss = model(input_ids=input_ids, attention_mask=attention, labels=labels).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def held_out_nll(model, tokenizer, prompt: str, documents) -> float:
    """Mean per-token NLL of documents the adapter never trained on."""
    scored = continuation_nll(model, tokenizer, [prompt] * len(documents), [d.text for d in documents])
    return sum(nll for nll, _ in scored) / sum(n for _, n in scored)


def test_training_a_clients_adapter_personalizes_it_and_only_it(tiny_generator, tmp_path):
    # Prepare: two clients with their synthetic data, each with a fresh (untrained) adapter.
    base, tokenizer, _ = tiny_generator
    synthesize(tmp_path, clients=2, seed=0)
    alice, bob = load_client_data(tmp_path, "client-00"), load_client_data(tmp_path, "client-01")
    for index, client in enumerate(["client-00", "client-01"]):
        save_adapter(
            attach_lora(copy.deepcopy(base), AdapterConfig(), seed=index),
            client_adapter_dir(tmp_path, client),
        )
    bob_files = {p.name: p.read_bytes() for p in client_adapter_dir(tmp_path, "client-01").iterdir()}
    engine = Engine(
        copy.deepcopy(base), tokenizer, data_root=tmp_path, serving=ServingConfig(max_new_tokens=12)
    )

    def answers(client: str, data) -> list[str]:
        return [
            engine.generate(GenerationRequest(client, qa.question, passages=[])).text for qa in data.qa[:4]
        ]

    alice_before, bob_before = answers("client-00", alice), answers("client-01", bob)
    note = chat_prompt(tokenizer, "Read me one of my notes.")
    train_docs, held_out = alice.documents[:-8], alice.documents[-8:]
    fresh = attach_lora(copy.deepcopy(base), AdapterConfig(), seed=0)
    loss_before = held_out_nll(fresh, tokenizer, note, held_out)

    # Execute: train alice's adapter on her instructions and notes, not on the held-out notes.
    pairs = [(chat_prompt(tokenizer, i.prompt), i.response) for i in alice.instructions]
    pairs += [(note, d.text) for d in train_docs]
    train(fresh, tokenizer, pairs, steps=20)
    save_adapter(fresh, client_adapter_dir(tmp_path, "client-00"))

    # Assert: alice's held-out loss drops and the serving engine picks up her new adapter...
    # The tiny random model's embeddings are small (std 0.02), which bounds how far a q/v adapter
    # can move its logits: measured drops are ~0.1 nat/token, far above float noise (~1e-6).
    loss_after = held_out_nll(fresh, tokenizer, note, held_out)
    assert loss_after < loss_before - 0.03, (loss_before, loss_after)
    alice_after = answers("client-00", alice)
    assert alice_after != alice_before
    served = engine.generate(GenerationRequest("client-00", alice.qa[0].question, passages=[])).adapter
    assert (served.kind, served.version) == ("client", 2)
    # ... while bob's adapter files and answers are untouched.
    assert {p.name: p.read_bytes() for p in client_adapter_dir(tmp_path, "client-01").iterdir()} == bob_files
    assert read_adapter_info(client_adapter_dir(tmp_path, "client-01")).version == 1
    assert answers("client-01", bob) == bob_before
