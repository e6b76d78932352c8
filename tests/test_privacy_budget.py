"""A budget no setting can quietly raise, one ledger for every spend, and accounting that composes.

The CLI runs on the tiny model; the accounting is checked against an independent computation with
Google's dp-accounting, the ledger's history built by the ledger's own writers.
"""

from __future__ import annotations

import json

import dp_accounting
import numpy as np
import pytest
from dp_accounting.pld import pld_privacy_accountant
from dp_accounting.rdp import rdp_privacy_accountant

from pfi_rag.config import Config, PrivacyConfig
from pfi_rag.data.synth import synthesize
from pfi_rag.layout import client_dir, client_ledger_file
from pfi_rag.privacy import BudgetExceeded, PrivacyError, PrivacyLedger
from pfi_rag.privacy.accounting import epsilon_of, noise_for_spend
from pfi_rag.privacy.release import release_metrics
from pfi_rag.probes.base import Verdict
from pfi_rag.probes.budget import BudgetProbe
from pfi_rag.probes.context import ProbeContext
from tests.test_privacy_cli import run

CLIENT = "client-00"


def independent(history, delta: float, mechanism: str) -> float:
    """dp-accounting's own composition of the same mechanisms (add/remove neighbours)."""
    if mechanism == "pld":
        accountant = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
    else:
        accountant = rdp_privacy_accountant.RdpAccountant()
    for sigma, rate, steps in history:
        gaussian = dp_accounting.GaussianDpEvent(sigma)
        event = gaussian if rate >= 1 else dp_accounting.PoissonSampledDpEvent(rate, gaussian)
        accountant.compose(event, steps)
    return accountant.get_epsilon(delta)


@pytest.mark.parametrize("mechanism", ["pld", "rdp"])
def test_a_mixed_history_composes_to_what_dp_accounting_computes(tmp_path, mechanism):
    # Prepare: three DP-SGD spends (different noise, rate, steps), two round-metric releases and a
    # private probe release, each written by the ledger's own writer
    cfg = PrivacyConfig(accountant=mechanism, epsilon_max=100.0, delta=1e-5)
    ledger = PrivacyLedger.open(tmp_path, CLIENT, cfg)
    history: list[tuple[float, float, int]] = []
    for entry, kind in [
        ((1.1, 1 / 9, 10), "dp-sgd"),
        ((10.0, 1.0, 1), "round-metrics"),
        ((0.9, 1 / 9, 10), "dp-sgd"),
        ((10.0, 1.0, 1), "round-metrics"),
        ((2.0, 1 / 4, 25), "dp-sgd"),
    ]:
        history.append(entry)
        if kind == "dp-sgd":
            ledger.commit({"history": list(history), "mechanism": "rdp"}, records=68, max_grad_norm=1.0)
        else:
            ledger.commit_release(entry, records=68)
    release = release_metrics(
        tmp_path, CLIENT, cfg, {"budget.violations": 0.0}, {"budget.violations": (0.0, 10.0)},
        epsilon=0.5, rng=np.random.default_rng(0),
    )  # fmt: skip

    # Execute
    stored = PrivacyLedger.open(tmp_path, CLIENT, cfg)
    expected = independent(stored.history, 1e-5, mechanism)

    # Assert: six spends of three kinds; the ledger's epsilon is dp-accounting's within 0.5%
    assert [s.kind for s in stored.spends] == [
        "dp-sgd", "round-metrics", "dp-sgd", "round-metrics", "dp-sgd", "probe-release",
    ]  # fmt: skip
    assert stored.epsilon_spent == pytest.approx(expected, rel=0.005)
    assert release.epsilon_spent_total == pytest.approx(stored.epsilon_spent, rel=1e-9)
    assert 0 < release.epsilon <= 0.5 + 0.005  # the release took what it was given, no more


def test_pld_needs_less_noise_than_rdp_for_the_same_epsilon():
    history = [(1.2, 1 / 9, 10), (10.0, 1.0, 1)]
    solved = {
        mechanism: noise_for_spend(
            history, epsilon=1.0, sample_rate=1 / 9, steps=10, delta=1e-5, mechanism=mechanism
        )
        for mechanism in ("pld", "rdp")
    }
    assert solved["pld"] < solved["rdp"]
    for mechanism, sigma in solved.items():
        before = epsilon_of(history, delta=1e-5, mechanism=mechanism)
        after = epsilon_of([*history, (sigma, 1 / 9, 10)], delta=1e-5, mechanism=mechanism)
        assert 1.0 - 0.006 <= after - before <= 1.0 + 1e-9


def test_gdp_is_gone_and_an_unknown_accountant_is_named():
    with pytest.raises(ValueError, match="gdp"):
        epsilon_of([(1.0, 0.1, 10)], delta=1e-5, mechanism="gdp")
    with pytest.raises(ValueError):
        PrivacyConfig(accountant="gdp")


def test_probe_releases_are_charged_to_the_ledger_and_refused_past_the_budget(tmp_path):
    cfg = PrivacyConfig(epsilon_max=1.0)
    exact, bounds = {"budget.violations": 0.0}, {"budget.violations": (0.0, 10.0)}

    first = release_metrics(tmp_path, CLIENT, cfg, exact, bounds, epsilon=0.6, rng=np.random.default_rng(0))
    with pytest.raises(BudgetExceeded):
        release_metrics(tmp_path, CLIENT, cfg, exact, bounds, epsilon=0.6, rng=np.random.default_rng(1))

    ledger = PrivacyLedger.open(tmp_path, CLIENT, cfg)
    assert [s.kind for s in ledger.spends] == ["probe-release"]
    assert ledger.epsilon_spent == pytest.approx(first.epsilon_spent_total)
    assert not (client_dir(tmp_path, CLIENT) / "probes" / "releases.json").exists()  # no second ledger


def train(root, model_cache, *extra):
    return run(root, model_cache, *extra[:-4], "train", "--client", CLIENT, *extra[-4:], "--json")


def test_the_budget_is_fixed_at_creation_and_changed_only_on_purpose(isolated_env, model_cache):
    root = isolated_env
    synthesize(root, clients=1, seed=0)
    budget3 = ("--set", "privacy.epsilon_max=3")
    raised = ("--set", "privacy.epsilon_max=100")

    # A first spend creates the ledger with a budget of 3.
    first = train(root, model_cache, *budget3, "--epsilon", "2", "--steps", "1")
    assert first.exit_code == 0, first.output
    # --set cannot raise it: the next spend of 2 would pass 3, and is refused.
    past = train(root, model_cache, *raised, "--epsilon", "2", "--steps", "1")
    assert past.exit_code == 2 and "set-budget" in past.output
    ledger = json.loads(run(root, model_cache, *raised, "privacy", "--client", CLIENT, "--json").stdout)
    assert ledger["epsilon_max"] == 3.0 and len(ledger["budget"]) == 1

    # set-budget can, and says why in the ledger's history.
    changed = run(root, model_cache, "privacy", "set-budget", "--client", CLIENT, "6", "--reason", "audit ok")
    assert changed.exit_code == 0, changed.output
    again = train(root, model_cache, "--epsilon", "2", "--steps", "1")
    assert again.exit_code == 0, again.output
    ledger = json.loads(run(root, model_cache, "privacy", "--client", CLIENT, "--json").stdout)
    assert [b["epsilon_max"] for b in ledger["budget"]] == [3.0, 6.0]
    assert ledger["budget"][1]["reason"] == "audit ok"
    ctx = ProbeContext(Config(data_root=root))
    flagged = BudgetProbe().run_client(ctx, CLIENT)
    assert flagged.verdict == Verdict.FAIL
    assert any("budget changed from 3.0 to 6.0" in v for v in flagged.evidence["violations"])

    # An edited history is flagged.
    path = client_ledger_file(root, CLIENT)
    state = json.loads(path.read_text())
    state["spends"][0]["noise_multiplier"] *= 2  # someone claims more noise than was applied
    path.write_text(json.dumps(state))
    edited = BudgetProbe().run_client(ctx, CLIENT)
    assert any("spend 1 was edited" in v for v in edited.evidence["violations"])

    # A deleted ledger does not reset the budget: the adapter remembers what it absorbed.
    path.unlink()
    restarted = train(root, model_cache, "--epsilon", "1", "--steps", "1")
    assert restarted.exit_code == 2 and "deleted or replaced" in restarted.output
    assert "fresh" in restarted.output  # and says how to start over deliberately
    assert not path.exists()
    mismatch = BudgetProbe().run_client(ctx, CLIENT)
    assert mismatch.verdict == Verdict.FAIL  # no ledger beside a trained adapter


def test_a_replaced_ledger_is_flagged_by_the_probe(tmp_path):
    """An adapter that absorbed more than its (replaced) ledger records."""
    from pfi_rag.models.adapters import METADATA_FILE, client_adapter_dir

    cfg = PrivacyConfig(epsilon_max=10.0)
    ledger = PrivacyLedger.open(tmp_path, CLIENT, cfg)
    ledger.commit({"history": [(1.0, 0.25, 4)], "mechanism": "rdp"}, records=12, max_grad_norm=1.0)
    adapter = client_adapter_dir(tmp_path, CLIENT)
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text("{}")
    (adapter / METADATA_FILE).write_text(
        json.dumps({"version": 3, "round": None, "created_at": "", "source": "local", "epsilon": 7.5})
    )
    with pytest.raises(PrivacyError, match="deleted or replaced"):
        PrivacyLedger.open(tmp_path, CLIENT, cfg).check_absorbed(7.5)
    result = BudgetProbe().run_client(ProbeContext(Config(data_root=tmp_path)), CLIENT)
    assert any("absorbed epsilon 7.500" in v for v in result.evidence["violations"])


def test_delta_is_a_constant_checked_against_the_clients_own_n(tmp_path):
    ledger = PrivacyLedger.open(tmp_path, CLIENT, PrivacyConfig(delta=0.05))
    assert ledger.delta_for(10) == 0.05  # the same for every n it is valid for
    with pytest.raises(PrivacyError, match="not below 1/20"):
        ledger.delta_for(20)


def test_server_side_sampling_is_accounted_as_the_fixed_size_sample_it_is():
    from pfi_rag.federation.aggregation import client_level_epsilon

    # Everyone every round: replacing one client moves the clipped sum by 2C, so each round is a
    # Gaussian of noise multiplier z/2 = 1; three rounds compose.
    everyone = client_level_epsilon(2.0, sampled=10, population=10, rounds=3, delta=1e-5)
    accountant = rdp_privacy_accountant.RdpAccountant()
    accountant.compose(dp_accounting.GaussianDpEvent(1.0), 3)
    assert everyone == pytest.approx(accountant.get_epsilon(1e-5), rel=1e-9)
    # 3 of 10 drawn without replacement: amplified, yet above what accounting it as Poisson sampling
    # at q = 0.3 with noise z (add/remove one client) claimed, which under-reported it.
    sampled = client_level_epsilon(2.0, sampled=3, population=10, rounds=3, delta=1e-5)
    poisson = rdp_privacy_accountant.RdpAccountant()
    poisson.compose(dp_accounting.PoissonSampledDpEvent(0.3, dp_accounting.GaussianDpEvent(2.0)), 3)
    assert poisson.get_epsilon(1e-5) < sampled < everyone
