from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.config import ConfigError, load_config


def test_defaults_without_a_file(isolated_env):
    cfg = load_config()
    assert cfg.data_root == Path("pfi-data")
    assert cfg.models.generator == "smollm2"
    assert cfg.models.embedder == "all-minilm-l6-v2"
    assert cfg.models.device == "auto"


def test_sources_stack_file_then_env_then_overrides(isolated_env, monkeypatch):
    Path("pfi-rag.toml").write_text('data_root = "from-file"\n[privacy]\nepsilon_max = 3.0\nbatch_size = 5\n')
    monkeypatch.setenv("PFI_RAG_PRIVACY__EPSILON_MAX", "4.5")
    cfg = load_config(overrides={"privacy.batch_size": 7})
    assert cfg.data_root == Path("from-file")  # file over default
    assert cfg.privacy.epsilon_max == 4.5  # environment over file
    assert cfg.privacy.batch_size == 7  # override over file
    assert cfg.privacy.max_grad_norm == 1.0  # untouched keys keep their default


def test_unknown_key_is_named(isolated_env):
    Path("pfi-rag.toml").write_text("[privacy]\nepsilon_maxx = 3.0\n")
    with pytest.raises(ConfigError, match=r"privacy\.epsilon_maxx.*unknown key"):
        load_config()


def test_bad_value_is_named(isolated_env):
    with pytest.raises(ConfigError, match=r"models\.device"):
        load_config(overrides={"models.device": "tpu"})
    with pytest.raises(ConfigError, match=r"retrieval"):
        load_config(overrides={"retrieval.chunk_tokens": 32, "retrieval.chunk_overlap": 40})


def test_missing_explicit_file_is_an_error(isolated_env):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config("nope.toml")


def test_cli_config_show_and_bad_value_exit_2(isolated_env):
    runner = CliRunner()
    shown = runner.invoke(app, ["--set", "privacy.epsilon_max=2.5", "config", "show"])
    assert shown.exit_code == 0, shown.output
    assert '"epsilon_max": 2.5' in shown.output

    bad = runner.invoke(app, ["--set", "privacy.epsilon_max=-1", "config", "show"])
    assert bad.exit_code == 2
    assert "privacy.epsilon_max" in bad.output
