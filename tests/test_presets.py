"""The demo's and the benchmark's presets are one type whose overrides are valid config."""

from __future__ import annotations

import pytest

from pfi_rag.benchmark.runs import PRESETS
from pfi_rag.cli.end_to_end import FULL, QUICK
from pfi_rag.config import load_config
from pfi_rag.presets import Preset

EVERY = {"demo full": FULL, "demo quick": QUICK, **{f"bench {name}": p for name, p in PRESETS.items()}}


@pytest.mark.parametrize("preset", EVERY.values(), ids=list(EVERY))
def test_every_preset_loads_as_a_config_with_its_settings(isolated_env, preset):
    cfg = load_config(None, preset.overrides())

    for key, value in preset.overrides().items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == value, key


def test_a_preset_sets_only_the_keys_it_names():
    preset = Preset(name="small", rounds=1, generator="tiny-random")

    expected = {"models.generator": "tiny-random", "models.threads": 1, "federation.rounds": 1}
    assert preset.overrides() == expected
