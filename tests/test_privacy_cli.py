"""`pfi-rag train` and `pfi-rag privacy` on the tiny model: train, ledger, refusals with exit 2."""

import json

from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.data.synth import synthesize


def run(root, model_cache, *args):
    options = [
        "--data-root",
        str(root),
        "--set",
        "models.generator=tiny-random",
        "--set",
        "models.device=cpu",
    ]
    options += ["--set", f"models.cache_dir={model_cache}", "--set", "privacy.max_seq_len=16"]
    return CliRunner().invoke(app, [*options, *args])


def test_train_then_privacy_shows_the_spend(isolated_env, model_cache):
    synthesize(isolated_env, clients=1, seed=0)

    trained = run(
        isolated_env,
        model_cache,
        "train",
        "--client",
        "client-00",
        "--epsilon",
        "1",
        "--steps",
        "2",
        "--json",
    )
    ledger = run(isolated_env, model_cache, "privacy", "--client", "client-00", "--json")
    table = run(isolated_env, model_cache, "privacy", "--client", "client-00")

    assert trained.exit_code == 0, trained.output
    result = json.loads(trained.stdout)
    assert result["steps"] == 2 and 0.98 < result["epsilon"] <= 1.0 and result["adapter_version"] == 1
    assert (isolated_env / "clients" / "client-00" / "adapter" / "adapter_config.json").is_file()
    assert ledger.exit_code == 0
    spends = json.loads(ledger.stdout)["spends"]
    assert len(spends) == 1 and spends[0]["epsilon_after"] == result["epsilon_total"]
    assert table.exit_code == 0 and "privacy ledger of client-00" in table.stdout


def test_bad_training_requests_exit_2_with_one_line(isolated_env, model_cache):
    synthesize(isolated_env, clients=1, seed=0)
    cases = [
        (["--client", "client-00", "--epsilon", "1", "--noise-multiplier", "1"], "not both"),
        (["--client", "Bad/Id"], "--client"),
        (["--client", "nobody"], "no training data"),
        (["--client", "client-00", "--epsilon", "9"], "left"),  # past the default budget of 8
        (["--client", "client-00", "--noise-multiplier", "0"], "left"),  # no noise: unbounded epsilon
    ]
    for args, message in cases:
        result = run(isolated_env, model_cache, "train", *args)
        assert result.exit_code == 2, (args, result.output)
        assert message in result.output
    assert not (isolated_env / "clients" / "client-00" / "privacy.json").exists()
