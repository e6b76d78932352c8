"""DP-SGD on the tiny Llama's LoRA adapter with real Opacus: clipping, noise, learning, cleanup."""

import copy

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant

from pfi_rag.config import AdapterConfig, PrivacyConfig
from pfi_rag.data.records import Document, Instruction
from pfi_rag.models.lora import attach_lora, is_lora_b, load_lora_arrays, lora_arrays
from pfi_rag.privacy import PrivacyLedger, TrainResult, train_adapter
from pfi_rag.privacy.dataset import IGNORE_INDEX, build_examples
from pfi_rag.privacy.round_metrics import noised_round_metrics, released_loss_std
from pfi_rag.privacy.training import metric_sample

DOCUMENTS = [
    Document(id="d0", text="Note (2025-03-02): my dog Biscuit sees the vet on Fridays."),
    Document(id="d1", text="Message to Sam: I moved to Lisbon."),
    Document(
        id="d2", text="Subject: Allergies\n\nHi Sam,\n\nI am allergic to peanuts, remember that.\n\nBest"
    ),
    Document(id="d3", text="Note: bike code 4471."),
]
INSTRUCTIONS = [
    Instruction(prompt="Where do I live?", response="You live in Lisbon."),
    Instruction(prompt="What is my dog called?", response="Your dog is called Biscuit."),
]
RECORDS = len(DOCUMENTS) + len(INSTRUCTIONS)


def fresh_peft(tiny_generator, *, dtype=torch.float32, seed=0):
    """A new LoRA adapter on a copy of the tiny model; B is made non-zero so A gets gradients too."""
    model, tokenizer, _ = tiny_generator
    peft = attach_lora(copy.deepcopy(model), AdapterConfig(r=4), seed=seed).to(dtype)
    rng = np.random.default_rng(seed)
    load_lora_arrays(
        peft, {n: rng.normal(0, 0.1, a.shape) for n, a in lora_arrays(peft).items() if is_lora_b(n)}
    )
    return peft, tokenizer


def trainable(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


def hand_clipped_mean(model, tokenizer, cfg: PrivacyConfig) -> dict[str, torch.Tensor]:
    """Per record: loss = mean NLL of its target tokens, gradient, clip to C; sum; / batch size."""
    examples = build_examples(tokenizer, DOCUMENTS, INSTRUCTIONS, max_len=cfg.max_seq_len)
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    total = {name: torch.zeros_like(p) for name, p in params.items()}
    norms = []
    for example in examples:
        ids = example.input_ids[None]
        labels = example.labels[1:]
        logits = model(input_ids=ids).logits[0, :-1]
        keep = labels != IGNORE_INDEX
        loss = torch.nn.functional.cross_entropy(logits[keep], labels[keep])
        grads = torch.autograd.grad(loss, list(params.values()))
        norm = torch.sqrt(sum((g * g).sum() for g in grads))
        norms.append(float(norm))
        factor = min(1.0, cfg.max_grad_norm / (float(norm) + 1e-6))  # Opacus's flat clipping
        for name, g in zip(params, grads, strict=True):
            total[name] += factor * g
    assert min(norms) < cfg.max_grad_norm < max(norms), f"clipping should bind for some records: {norms}"
    return {name: t / len(examples) for name, t in total.items()}


def clip_config(mode: str = "hooks") -> PrivacyConfig:
    # One step of plain SGD with lr 1 on every record (q = 1): the weight change is the gradient.
    return PrivacyConfig(
        grad_sample_mode=mode, optimizer="sgd", learning_rate=1.0, batch_size=RECORDS, max_grad_norm=0.5
    )


@pytest.fixture(scope="module")
def expected_clipped(tiny_generator):
    model, tokenizer = fresh_peft(tiny_generator, dtype=torch.float64)
    return hand_clipped_mean(model, tokenizer, clip_config())


@pytest.mark.parametrize("mode", ["hooks", "functorch", "ghost"])
def test_clipped_gradient_opacus_applies_equals_hand_written_clip(tiny_generator, expected_clipped, mode):
    """Guards Opacus issue #820: with LoRA on a Llama, the clipped sum must be the real one."""
    # Prepare: float64 so the weight difference recovers the applied gradient exactly.
    model, tokenizer = fresh_peft(tiny_generator, dtype=torch.float64)
    cfg, expected = clip_config(mode), expected_clipped
    before = trainable(model)

    # Execute
    result = train_adapter(
        model,
        tokenizer,
        documents=DOCUMENTS,
        instructions=INSTRUCTIONS,
        cfg=cfg,
        ledger=None,
        seed=0,
        noise_multiplier=0.0,
        steps=1,
    )

    # Assert
    assert result.sample_rate == 1.0 and result.steps == 1
    applied = {name: before[name] - value for name, value in trainable(model).items()}
    diff = torch.sqrt(sum(((applied[n] - expected[n]) ** 2).sum() for n in expected))
    size = torch.sqrt(sum((expected[n] ** 2).sum() for n in expected))
    assert float(size) > 0
    assert float(diff / size) < 1e-5


def test_dp_training_moves_the_adapter_and_leaves_a_plain_model(tiny_generator):
    # Prepare
    model, tokenizer = fresh_peft(tiny_generator)
    hooks_before = sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules())
    before = lora_arrays(model)
    cfg = PrivacyConfig(batch_size=3, max_seq_len=24, learning_rate=1e-2)

    # Execute: two calls on the same model (no Opacus state may carry over)
    first = train_adapter(
        model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=cfg, ledger=None, seed=1,
        noise_multiplier=1.0, steps=2,
    )  # fmt: skip
    second = train_adapter(
        model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=cfg, ledger=None, seed=2,
        noise_multiplier=1.0, steps=1,
    )  # fmt: skip

    # Assert
    after = lora_arrays(model)
    assert all(not np.allclose(before[name], after[name]) for name in before)
    assert isinstance(first, TrainResult) and first.private and 0 < first.epsilon < np.inf
    assert second.steps == 1 and second.tokens > 0
    assert type(model).__name__ == "PeftModelForCausalLM"
    assert sum(len(m._forward_hooks) + len(m._backward_hooks) for m in model.modules()) == hooks_before
    assert not any(hasattr(p, "grad_sample") or p.grad is not None for p in model.parameters())
    assert not model.training
    with torch.no_grad():  # a normal forward pass still works, with a batch size Opacus never saw
        assert model(input_ids=torch.tensor([[1, 2, 3]])).logits.shape[:2] == (1, 3)


def test_non_private_training_lowers_the_training_loss(tiny_generator):
    model, tokenizer = fresh_peft(tiny_generator)
    cfg = PrivacyConfig(batch_size=3, max_seq_len=24, learning_rate=3e-2)

    result = train_adapter(
        model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=cfg, ledger=None, seed=0,
        steps=8, private=False,
    )  # fmt: skip

    assert result.noise_multiplier is None and result.epsilon == np.inf
    assert result.loss_after < result.loss_before - 0.05


def _one_step(tiny_generator, *, seed: int, sigma: float) -> dict[str, np.ndarray]:
    model, tokenizer = fresh_peft(tiny_generator)
    # max_seq_len fits every record whole: a longer document would be drawn as one of its windows,
    # picked by the seed, and two seeds would then differ in more than the noise.
    cfg = PrivacyConfig(
        optimizer="sgd", learning_rate=1.0, batch_size=RECORDS, max_grad_norm=0.5, max_seq_len=48
    )
    train_adapter(
        model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=cfg, ledger=None, seed=seed,
        noise_multiplier=sigma, steps=1,
    )  # fmt: skip
    return lora_arrays(model)


def test_noise_is_applied_at_the_configured_scale(tiny_generator):
    # Prepare: one SGD step (lr 1) on every record (q = 1): two seeds see the same batch, so their
    # weights differ only by noise: per coordinate (z1 - z2) * sigma * C / B, std sqrt(2) sigma C / B.
    sigma, clip = 2.0, 0.5
    expected_std = np.sqrt(2) * sigma * clip / RECORDS

    # Execute
    a, b = _one_step(tiny_generator, seed=0, sigma=sigma), _one_step(tiny_generator, seed=1, sigma=sigma)
    quiet_a, quiet_b = (
        _one_step(tiny_generator, seed=0, sigma=0.0),
        _one_step(tiny_generator, seed=1, sigma=0.0),
    )

    # Assert
    difference = np.concatenate([(a[n] - b[n]).ravel() for n in a])
    assert difference.size > 1000
    assert np.std(difference) == pytest.approx(expected_std, rel=0.1)
    assert abs(np.mean(difference)) < 4 * expected_std / np.sqrt(difference.size)
    for name in quiet_a:
        np.testing.assert_array_equal(quiet_a[name], quiet_b[name])


def test_an_empty_first_poisson_draw_takes_a_noise_only_step(tiny_generator):
    """Poisson sampling at q = 1/40 draws no record in ~37% of first steps. That step must still
    add noise (skipping it would reveal the empty draw), for every grad_sample_mode; Opacus built
    its empty first batch from dataset[0] and crashed on records held as Python lists (found by
    the silent-failure benchmark: one client failed every round of one seed)."""
    documents = [Document(id=f"n{i}", text=f"Note {i}: the code is {1000 + i}.") for i in range(40)]
    for mode in ("hooks", "functorch", "ghost"):
        cfg = PrivacyConfig(batch_size=1, max_seq_len=16, grad_sample_mode=mode)
        empty_first = []
        for seed in range(8):
            model, tokenizer = fresh_peft(tiny_generator)
            before = lora_arrays(model)
            result = train_adapter(
                model, tokenizer, documents=documents, instructions=[], cfg=cfg, ledger=None, seed=seed,
                noise_multiplier=1.0, steps=1,
            )  # fmt: skip
            if result.empty_steps == 1:
                empty_first.append(seed)
                after = lora_arrays(model)
                assert result.steps == 1 and result.tokens == 0
                assert all(not np.allclose(before[name], after[name]) for name in before)  # noise went out
        assert empty_first, f"{mode}: no seed drew an empty first batch; pick more seeds"


def test_without_a_seed_the_noise_is_fresh_every_time(tiny_generator):
    """Every real client trains with seed=None: sampling and noise come from the OS, so nobody who
    knows the configuration (the server included) can regenerate the noise and subtract it."""
    runs = []
    for _ in range(2):
        model, tokenizer = fresh_peft(tiny_generator)
        train_adapter(
            model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=clip_config(),
            ledger=None, noise_multiplier=2.0, steps=1,
        )  # fmt: skip
        runs.append(lora_arrays(model))
    assert all(not np.allclose(runs[0][name], runs[1][name]) for name in runs[0])


def test_round_metrics_are_released_noised_inside_the_rounds_spend(tiny_generator, tmp_path):
    cfg = PrivacyConfig(
        batch_size=2, max_seq_len=48, epsilon_max=50.0, delta=1e-3, round_metrics_noise=10.0, accountant="rdp"
    )
    ledger = PrivacyLedger.open(tmp_path, "client-00", cfg)
    model, tokenizer = fresh_peft(tiny_generator)

    result = train_adapter(
        model, tokenizer, documents=DOCUMENTS, instructions=INSTRUCTIONS, cfg=cfg, ledger=ledger,
        epsilon=2.0, steps=3, release_metrics=True,
    )  # fmt: skip

    # The release is charged in the same call, which still costs the epsilon it was given.
    stored = PrivacyLedger.open(tmp_path, "client-00", cfg)
    assert [s.kind for s in stored.spends] == ["dp-sgd", "round-metrics"]
    assert stored.history[-1] == (10.0, 1.0, 1)
    independent = RDPAccountant()
    independent.history = stored.history
    assert stored.epsilon_spent == pytest.approx(independent.get_epsilon(delta=1e-3), rel=1e-9)
    assert result.epsilon == pytest.approx(2.0, abs=0.006) and result.epsilon_total == stored.epsilon_spent
    # What is released is not the exact count or losses.
    released = result.released_metrics
    assert set(released) == {"num-examples", "loss-before", "loss-after"}
    assert released["num-examples"] != RECORDS and released["loss-before"] != result.loss_before
    # The losses were evaluated on the fixed-size sample: 16 records' worth for these 6.
    assert result.evaluated == cfg.round_metrics_sample == 16


@pytest.mark.parametrize("records", [1000, 40])  # more records than the sample, and fewer
def test_released_round_metrics_carry_noise_of_the_stated_scale(records):
    z, clip, sample = 1.0, 12.0, 50
    rng = np.random.default_rng(0)
    evaluated = min(records, sample)  # the sums run over the sample (every record when fewer)
    draws = [
        noised_round_metrics(
            [5.0] * evaluated, [50.0] * evaluated, records=records, sample=sample, clip=clip,
            noise_multiplier=z, rng=rng,
        )  # fmt: skip
        for _ in range(4000)
    ]
    counts = np.array([d["num-examples"] for d in draws])
    assert counts.mean() == pytest.approx(records, abs=0.1)
    assert counts.std() == pytest.approx(z * np.sqrt(3), rel=0.05)  # sensitivity sqrt(3)
    before = np.array([d["loss-before"] for d in draws])
    assert before.mean() == pytest.approx(5.0, abs=0.02)
    # The std the server states beside a released loss (first order in the noise): at or above
    # the sample size the divisor is the constant sample, 12 * sqrt(3) / 50 = 0.42 here.
    stated = released_loss_std(records, 5.0, clip=clip, noise_multiplier=z, sample=sample)
    if records >= sample:
        assert stated == pytest.approx(clip * np.sqrt(3) / sample)
    assert before.std() == pytest.approx(stated, rel=0.05)
    after = np.array([d["loss-after"] for d in draws])  # every record's loss of 50 counts as 12
    assert after.max() == clip and np.median(after) == pytest.approx(clip, abs=0.05)
    assert len({d["loss-before"] for d in draws}) == len(draws)


def test_round_metrics_sample_is_fixed_size_without_replacement():
    examples = [f"record-{i}" for i in range(40)]
    rng = np.random.default_rng(0)

    many, counted = metric_sample(examples, 16, rng)
    few, few_counted = metric_sample(examples[:5], 16, rng)

    assert len(many) == len(few) == 16  # the same evaluation work for 40 records and for 5
    assert counted == 16 and len(set(many)) == 16  # drawn without replacement
    assert few_counted == 5 and set(few[:5]) == set(examples[:5])  # every record once, then repeats
    assert set(few[5:]) <= set(few[:5])
