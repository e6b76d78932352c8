"""A client's round without Flower: what each strategy trains, saves and spends."""

from __future__ import annotations

import numpy as np
import pytest

from pfi_rag.config import ConfigError
from pfi_rag.data.synth import synthesize
from pfi_rag.federation.strategies import shared_part
from pfi_rag.federation.task import SatOut, fresh_adapter, read_adapter_arrays, train_round
from pfi_rag.layout import client_adapter_dir, client_settings_file
from pfi_rag.privacy import PrivacyLedger
from tests.federation_support import tiny_federation_config


def test_ditto_spends_twice_per_round_and_keeps_a_personal_adapter_near_the_global(tmp_path, model_cache):
    synthesize(tmp_path, clients=1, seed=0)
    cfg = tiny_federation_config(
        tmp_path,
        model_cache,
        **{"federation.strategy": "ditto", "federation.ditto_lambda": 50.0, "privacy.learning_rate": 0.01},
    )
    global_arrays = shared_part(fresh_adapter(cfg)[2], "ditto")
    outcome = train_round(cfg, "client-00", global_arrays, server_round=1)
    assert not isinstance(outcome, SatOut)
    ledger = PrivacyLedger.open(tmp_path, "client-00", cfg.privacy)
    # The global copy (with the round's metric release) and the personal adapter.
    assert [s.kind for s in ledger.spends] == ["dp-sgd", "round-metrics", "dp-sgd"]
    assert "epsilon" not in outcome.privacy  # a function of n: stays in the ledger
    assert set(outcome.update) == set(global_arrays)  # ditto shares the whole global copy

    personal = read_adapter_arrays(client_adapter_dir(tmp_path, "client-00"))
    sent_global = {n: global_arrays[n] + outcome.update[n] for n in global_arrays}
    # lr * lambda = 0.5 per step: the personal adapter is pulled hard towards the global anchor,
    # so it ends closer to the anchor than the global copy that trained freely.
    distance_personal = sum(np.linalg.norm(personal[n] - global_arrays[n]) for n in global_arrays)
    distance_global_copy = sum(np.linalg.norm(sent_global[n] - global_arrays[n]) for n in global_arrays)
    assert 0 < distance_personal < distance_global_copy


def test_a_client_past_its_budget_sits_out(tmp_path, model_cache):
    synthesize(tmp_path, clients=1, seed=0)
    cfg = tiny_federation_config(
        tmp_path, model_cache, **{"privacy.epsilon_max": 5.0, "privacy.epsilon_per_round": 4.0}
    )
    global_arrays = shared_part(fresh_adapter(cfg)[2], "fedavg")
    assert not isinstance(train_round(cfg, "client-00", global_arrays, server_round=1), SatOut)
    second = train_round(cfg, "client-00", global_arrays, server_round=2)
    assert isinstance(second, SatOut)
    assert second.reason == "budget_exhausted"  # a code: how much was spent and left stays local
    assert len(PrivacyLedger.open(tmp_path, "client-00", cfg.privacy).spends) == 2  # round 1 and its metrics


def test_a_client_trains_with_its_own_privacy_settings_and_bad_ones_are_named(tmp_path, model_cache):
    """clients/<id>/settings.toml changes that client's [privacy] only; the ledger enforces it."""
    synthesize(tmp_path, clients=2, seed=0)
    cfg = tiny_federation_config(tmp_path, model_cache)
    settings = client_settings_file(tmp_path, "client-00")
    settings.write_text("[privacy]\nlocal_steps = 3\nepsilon_per_round = 0.5\n")
    global_arrays = shared_part(fresh_adapter(cfg)[2], "fedavg")
    own = train_round(cfg, "client-00", global_arrays, server_round=1)
    other = train_round(cfg, "client-01", global_arrays, server_round=1)
    assert own.privacy["local_steps"] == 3 and other.privacy["local_steps"] == cfg.privacy.local_steps
    assert own.privacy["epsilon_per_round"] == 0.5
    own_ledger = PrivacyLedger.open(tmp_path, "client-00", cfg.privacy)
    other_ledger = PrivacyLedger.open(tmp_path, "client-01", cfg.privacy)
    assert own_ledger.epsilon_spent == pytest.approx(0.5, abs=0.01)
    assert own_ledger.spends[0].noise_multiplier > other_ledger.spends[0].noise_multiplier  # less epsilon

    settings.write_text("[privacy]\nlearning_rat = 0.1\n")
    with pytest.raises(ConfigError, match=r"settings.toml \[privacy\]: config key 'learning_rat'"):
        train_round(cfg, "client-00", global_arrays, server_round=2)
    settings.write_text('[models]\ngenerator = "other"\n')
    with pytest.raises(ConfigError, match="only \\[privacy\\] may be set per client, not models"):
        train_round(cfg, "client-00", global_arrays, server_round=2)
    assert len(PrivacyLedger.open(tmp_path, "client-00", cfg.privacy).spends) == 2  # refused before training


def test_a_round_draws_fresh_noise_the_server_cannot_regenerate(tmp_path, model_cache):
    """The same client, round and configuration twice (two copies of its data root) send
    different updates and metrics: nothing public (seed, client id, round) fixes the noise."""
    outcomes = []
    for copy_name in ("a", "b"):
        synthesize(tmp_path / copy_name, clients=1, seed=0)
        cfg = tiny_federation_config(tmp_path / copy_name, model_cache)
        global_arrays = shared_part(fresh_adapter(cfg)[2], "fedavg")
        outcomes.append(train_round(cfg, "client-00", global_arrays, server_round=1))
    first, second = outcomes
    assert all(not np.allclose(first.update[name], second.update[name]) for name in first.update)
    assert first.metrics["num-examples"] != second.metrics["num-examples"]
