"""The privacy ledger: epsilon accumulates across calls and restarts; a spend past the budget is refused."""

import copy
import json
import math

import numpy as np
import pytest
from opacus.accountants import RDPAccountant

from pfi_rag.config import AdapterConfig, PrivacyConfig
from pfi_rag.data.records import Document, Instruction
from pfi_rag.models.lora import attach_lora, lora_arrays
from pfi_rag.privacy import BudgetExceeded, PrivacyLedger, train_adapter
from pfi_rag.privacy.accounting import noise_for_spend, sample_rate

DOCUMENTS = [Document(id=f"d{i}", text=f"Note {i}: the code is {1000 + i}.") for i in range(6)]
INSTRUCTIONS = [Instruction(prompt="Code?", response="It is 1000.")]
RECORDS = len(DOCUMENTS) + len(INSTRUCTIONS)
# RDP here: these tests check the ledger against Opacus's own accountant bit for bit
# (tests/test_privacy_accounting.py checks both accountants against dp-accounting).
CFG = PrivacyConfig(batch_size=2, max_seq_len=16, epsilon_max=100.0, accountant="rdp")


def train(tiny_generator, ledger, **kwargs):
    model, tokenizer, _ = tiny_generator
    peft = attach_lora(copy.deepcopy(model), AdapterConfig(r=2))
    cfg = CFG.model_copy(update={"epsilon_max": ledger.epsilon_max})
    result = train_adapter(
        peft,
        tokenizer,
        documents=DOCUMENTS,
        instructions=INSTRUCTIONS,
        cfg=cfg,
        ledger=ledger,
        seed=0,
        **kwargs,
    )
    return peft, result


def independent_epsilon(history, delta) -> float:
    accountant = RDPAccountant()
    for sigma, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=sigma, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def test_epsilon_accumulates_across_calls_and_a_restart(tiny_generator, tmp_path):
    # Prepare: q = 1/ceil(7/2) = 1/4; delta is the configured constant, whatever n is
    q, delta = 1 / 4, CFG.delta

    # Execute: two calls, then a "restart" (a new ledger object read from disk) and a third
    _, first = train(
        tiny_generator, PrivacyLedger.open(tmp_path, "alice", CFG), noise_multiplier=1.0, steps=3
    )
    _, second = train(
        tiny_generator, PrivacyLedger.open(tmp_path, "alice", CFG), noise_multiplier=1.5, steps=2
    )
    reopened = PrivacyLedger.open(tmp_path, "alice", CFG)
    spent_after_two = reopened.epsilon_spent
    _, third = train(tiny_generator, reopened, noise_multiplier=1.0, steps=2)
    final = PrivacyLedger.open(tmp_path, "alice", CFG)

    # Assert: the ledger's epsilon is an independent recomputation of the same (sigma, q, steps)
    two = [(1.0, q, 3), (1.5, q, 2)]
    assert first.sample_rate == q and final.delta == pytest.approx(delta)
    assert spent_after_two == pytest.approx(independent_epsilon(two, delta), rel=1e-9)
    assert second.epsilon_total == pytest.approx(spent_after_two, rel=1e-9)
    three = [*two, (1.0, q, 2)]
    assert final.epsilon_spent == pytest.approx(independent_epsilon(three, delta), rel=1e-9)
    assert third.epsilon == pytest.approx(final.epsilon_spent - spent_after_two, rel=1e-9)
    assert [s.steps for s in final.spends] == [3, 2, 2]
    assert [s.noise_multiplier for s in final.spends] == [1.0, 1.5, 1.0]
    assert [s.epsilon_after for s in final.spends] == pytest.approx(
        [first.epsilon_total, second.epsilon_total, third.epsilon_total]
    )
    assert final.remaining == pytest.approx(CFG.epsilon_max - final.epsilon_spent)
    stored = json.loads((tmp_path / "clients" / "alice" / "privacy.json").read_text())
    assert stored["accountant"]["mechanism"] == "rdp" and len(stored["spends"]) == 3

    # Cross-check with Google's dp-accounting (same RDP orders).
    dp_accounting = pytest.importorskip("dp_accounting")
    rdp = dp_accounting.rdp.RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    for sigma, rate, steps in three:
        event = dp_accounting.PoissonSampledDpEvent(rate, dp_accounting.GaussianDpEvent(sigma))
        rdp.compose(event, steps)
    assert final.epsilon_spent == pytest.approx(rdp.get_epsilon(delta), rel=1e-3)


def test_an_epsilon_spend_takes_that_much_from_the_budget(tiny_generator, tmp_path):
    ledger = PrivacyLedger.open(tmp_path, "bob", CFG)
    _, result = train(tiny_generator, ledger, epsilon=2.0, steps=2)
    assert 2.0 - 0.01 <= result.epsilon <= 2.0
    assert PrivacyLedger.open(tmp_path, "bob", CFG).epsilon_spent == pytest.approx(result.epsilon_total)


class Untouchable(list):
    """Records that may be counted but not read: the budget check must not need their content."""

    def __iter__(self):
        raise AssertionError("a record was read before the budget check")

    def __getitem__(self, index):
        raise AssertionError("a record was read before the budget check")


def test_a_spend_past_the_budget_is_refused_before_reading_data_and_writes_nothing(tiny_generator, tmp_path):
    # Prepare: a client that spent most of a budget of 3
    cfg = CFG.model_copy(update={"epsilon_max": 3.0})
    train(tiny_generator, PrivacyLedger.open(tmp_path, "carol", cfg), epsilon=2.5, steps=2)
    client = tmp_path / "clients" / "carol"
    files_before = {p: p.read_bytes() for p in client.rglob("*") if p.is_file()}
    ledger = PrivacyLedger.open(tmp_path, "carol", cfg)
    model, tokenizer, _ = tiny_generator
    peft = attach_lora(copy.deepcopy(model), AdapterConfig(r=2))
    weights = lora_arrays(peft)
    untouchable = Untouchable(DOCUMENTS)

    # Execute / Assert: by epsilon, by noise multiplier, and with no noise at all
    for kwargs in [{"epsilon": 1.0}, {"noise_multiplier": 0.3, "steps": 50}, {"noise_multiplier": 0.0}]:
        with pytest.raises(BudgetExceeded, match="left") as refused:
            train_adapter(
                peft,
                tokenizer,
                documents=untouchable,
                instructions=[],
                cfg=cfg,
                ledger=ledger,
                seed=0,
                **kwargs,
            )
        assert refused.value.remaining == pytest.approx(3.0 - ledger.epsilon_spent)
        assert f"{refused.value.remaining:.4g}" in str(refused.value)

    assert {p: p.read_bytes() for p in client.rglob("*") if p.is_file()} == files_before
    for name, value in lora_arrays(peft).items():
        np.testing.assert_array_equal(value, weights[name])


def test_a_refused_first_spend_creates_no_client_files(tiny_generator, tmp_path):
    cfg = CFG.model_copy(update={"epsilon_max": 0.5})
    with pytest.raises(BudgetExceeded):
        train(tiny_generator, PrivacyLedger.open(tmp_path, "dave", cfg), noise_multiplier=0.5, steps=20)
    assert not (tmp_path / "clients").exists()


def test_noise_for_a_spend_is_solved_against_the_history():
    q, delta, steps = 0.01, 1e-5, 1000
    # Known value: sigma 1.0, q 0.01, 1000 steps, delta 1e-5 -> epsilon 2.1014 with Opacus RDP.
    assert independent_epsilon([(1.0, q, steps)], delta) == pytest.approx(2.1014, abs=1e-3)
    sigma = noise_for_spend([], epsilon=2.1014, sample_rate=q, steps=steps, delta=delta, mechanism="rdp")
    assert sigma == pytest.approx(1.0, abs=0.01)
    later = noise_for_spend(
        [(1.0, q, steps)], epsilon=2.1014, sample_rate=q, steps=steps, delta=delta, mechanism="rdp"
    )
    assert later < sigma  # composition is sub-additive: the same spend buys less noise later
    assert (
        math.isinf(independent_epsilon([(1e-9, q, 1)], delta))
        or independent_epsilon([(1e-9, q, 1)], delta) > 1e3
    )
    assert sample_rate(7, 2) == 1 / 4 and sample_rate(930, 10) == 1 / 92  # Opacus's own rounding
