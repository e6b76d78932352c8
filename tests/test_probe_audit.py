"""The one-run privacy audit: its arithmetic by hand, and its verdicts on real DP-SGD runs.

The runs train the tiny Llama with LoRA on q/v and on ``lm_head``: on q/v alone the tiny random
model cannot move its near-uniform logits enough to memorise anything (tests/probe_support
explains why), so an audit of it would show no power; ``lm_head`` lets a non-private run
memorise the canaries in a few steps.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest

from pfi_rag import layout
from pfi_rag.config import AdapterConfig, Config, PrivacyConfig
from pfi_rag.data.audit_canaries import audit_training_documents, insertions, load_canaries
from pfi_rag.layout import client_adapter_dir
from pfi_rag.models.adapters import save_adapter
from pfi_rag.models.lora import attach_lora
from pfi_rag.privacy import PrivacyLedger, train_adapter
from pfi_rag.probes.audit import audit, epsilon_lower_bound, guess_counts, p_value
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.privacy_audit import AuditProbe, audit_canaries, canary_scores

CLIENT = "alice"
CANARIES = 64  # 16 guessed in, 16 out: all 32 right gives a bound of 2.32 at most
MARGIN = 1.5  # the non-private run's bound exceeds the DP run's by at least this much


# -- arithmetic ----------------------------------------------------------------------------------


def test_p_value_matches_a_hand_worked_example():
    # m = 2 canaries, both guessed (r = 2), both right (v = 2), delta = 0.01.
    # eps = 0: q = 1/2. P[B >= 2] = 1/4. The delta term: 2 m delta = 0.04 times
    # max(P[B = 1] / 1, P[B in {0, 1}] / 2) = max(1/2, 3/8) = 1/2, so 0.02. Total 0.27.
    assert p_value(m=2, r=2, v=2, epsilon=0.0, delta=0.01) == pytest.approx(0.27)
    # eps = ln 3: q = 3/4. P[B >= 2] = 9/16; P[B = 1] = 2 (3/4)(1/4) = 3/8, P[B = 0] = 1/16,
    # max(3/8, (3/8 + 1/16) / 2) = 3/8; 0.5625 + 0.04 x 0.375 = 0.5775.
    assert p_value(m=2, r=2, v=2, epsilon=math.log(3), delta=0.01) == pytest.approx(0.5775)
    # Without delta it is the binomial tail alone.
    assert p_value(m=2, r=2, v=2, epsilon=math.log(3), delta=0.0) == pytest.approx(0.5625)


def test_lower_bound_solves_the_binomial_tail_by_hand():
    # 10 guesses, all right, delta 0: P[B >= 10] = q^10 = 0.05 at q = 0.05^(1/10) = 0.74113,
    # so eps = ln(q / (1 - q)) = ln(2.8630) = 1.0519.
    q = 0.05**0.1
    assert epsilon_lower_bound(m=10, r=10, v=10, delta=0.0) == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    assert epsilon_lower_bound(m=10, r=10, v=10, delta=0.0) == pytest.approx(1.0519, abs=1e-4)
    # Chance-level guessing proves nothing; a delta term only lowers the bound.
    assert epsilon_lower_bound(m=10, r=10, v=5, delta=0.0) == 0.0
    assert 0 < epsilon_lower_bound(m=10, r=10, v=10, delta=1e-3) < 1.0519


def test_audit_guesses_the_highest_scores_in_and_the_lowest_out():
    # Scores 5..0; members are canaries 0, 1, 3. Two guessed in (0, 1: right), two out (4, 5: right).
    result = audit([5, 4, 3, 2, 1, 0], [1, 1, 0, 1, 0, 0], guessed_in=2, guessed_out=2, delta=0.0)
    assert (result.guesses, result.correct, result.members) == (4, 4, 3)
    # 4 of 4 right: q^4 = 0.05 gives q = 0.4729 < 1/2, so no positive epsilon is proven.
    assert result.epsilon_lower_bound == 0.0
    assert guess_counts(64, 0.25) == (16, 16) and guess_counts(3, 0.25) == (1, 1)


# -- runs ----------------------------------------------------------------------------------------


def _adapter(tiny_generator):
    model, _, _ = tiny_generator
    return attach_lora(
        copy.deepcopy(model), AdapterConfig(r=8, target_modules=["q_proj", "v_proj", "lm_head"]), seed=0
    )


@pytest.fixture(scope="module")
def runs(tiny_generator, tmp_path_factory, one_torch_thread):
    """One DP run (epsilon 2, ledger kept) and one non-private run, on the same 64 canaries."""
    root = tmp_path_factory.mktemp("audit")
    base, tokenizer, _ = tiny_generator
    cfg = PrivacyConfig(audit_canaries=CANARIES, batch_size=16, learning_rate=0.05)
    inserted = audit_training_documents(root, CLIENT, cfg)
    canaries = load_canaries(root, CLIENT)
    private = _adapter(tiny_generator)
    ledger = PrivacyLedger.open(root, CLIENT, cfg)
    train_adapter(
        private, tokenizer, documents=inserted, instructions=[], cfg=cfg, ledger=ledger,
        epsilon=2.0, steps=3, seed=1,
    )  # fmt: skip
    save_adapter(private, client_adapter_dir(root, CLIENT))
    public = _adapter(tiny_generator)
    train_adapter(
        public, tokenizer, documents=inserted, instructions=[], cfg=cfg, ledger=None,
        steps=10, seed=1, private=False,
    )  # fmt: skip
    public.eval()
    public_scores = canary_scores(base, public, tokenizer, canaries)
    return root, canaries, public, public_scores


def _context(root, tiny_models_config, tiny_generator) -> ProbeContext:
    model, tokenizer, _ = tiny_generator
    return ProbeContext(Config(data_root=root, models=tiny_models_config), generator=(model, tokenizer))


def test_canaries_are_kept_inserted_half_recorded_and_never_regenerated(runs):
    root, canaries, _, _ = runs
    assert len(canaries) == CANARIES and 16 < sum(c.inserted for c in canaries) < 48
    assert len({c.secret for c in canaries}) == CANARIES and all(len(c.secret) == 6 for c in canaries)
    again = audit_training_documents(root, CLIENT, PrivacyConfig(audit_canaries=CANARIES))
    assert [d.text for d in again] == [c.text for c in canaries if c.inserted]
    assert [i["inserted"] for i in insertions(root, CLIENT)] == [len(again)] * 2
    assert audit_training_documents(root, "bob", PrivacyConfig()) == []  # off by default
    assert not layout.client_canaries_file(root, "bob").exists()


def test_dp_run_stays_under_its_ledger_epsilon_and_a_non_private_run_does_not(
    runs, tiny_models_config, tiny_generator
):
    root, canaries, _, public_scores = runs
    ctx = _context(root, tiny_models_config, tiny_generator)

    dp = AuditProbe().run_client(ctx, CLIENT)
    public = audit_canaries(public_scores, canaries, guess_share=0.25, delta=dp.evidence["delta"])

    assert dp.verdict == Verdict.PASS, dp.evidence
    assert dp.evidence["epsilon_lower_bound"] <= dp.evidence["ledger_epsilon"] == pytest.approx(2.0, rel=0.01)
    assert dp.value == pytest.approx(dp.evidence["epsilon_lower_bound"] - dp.evidence["ledger_epsilon"])
    # Power: the same canaries trained on without DP are told apart almost perfectly.
    assert public.correct >= 30
    assert public.epsilon_lower_bound >= dp.evidence["epsilon_lower_bound"] + MARGIN


def test_audit_fails_loudly_when_the_ledger_claims_more_privacy_than_the_run_had(
    runs, tiny_models_config, tiny_generator, tmp_path
):
    # Privacy theatre: the non-private adapter is served while the ledger records epsilon 0.5.
    root, _, public, _ = runs
    theatre = tmp_path / "theatre"
    copied = layout.client_canaries_file(theatre, CLIENT)
    copied.parent.mkdir(parents=True)
    copied.write_text(layout.client_canaries_file(root, CLIENT).read_text())
    save_adapter(public, client_adapter_dir(theatre, CLIENT))
    spend = {"noise_multiplier": 1.0, "sample_rate": 0.25, "steps": 10, "epsilon_after": 0.5}
    ledger = {"delta": 1e-5, "epsilon_spent": 0.5, "spends": [spend]}
    layout.client_ledger_file(theatre, CLIENT).write_text(json.dumps(ledger))

    result = AuditProbe().run_client(_context(theatre, tiny_models_config, tiny_generator), CLIENT)

    assert result.verdict == Verdict.FAIL
    assert result.value == pytest.approx(result.evidence["epsilon_lower_bound"] - 0.5) and result.value > 1
    assert result.evidence["alarm"].startswith("DP bug")
    assert np.isfinite(result.metrics["epsilon_lower_bound"])


def test_audit_skips_with_the_command_that_turns_canaries_on(tmp_path, tiny_models_config, tiny_generator):
    layout.client_dir(tmp_path, "bob").mkdir(parents=True)
    result = AuditProbe().run_client(_context(tmp_path, tiny_models_config, tiny_generator), "bob")
    assert result.verdict == Verdict.SKIP
    assert "pfi-rag --set privacy.audit_canaries=64 train --client bob" in result.evidence["skipped"]
