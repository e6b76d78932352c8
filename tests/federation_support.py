"""A federation on the tiny model that finishes in seconds: its settings, as a config (the federation,
task and privacy-boundary tests) or as `pfi-rag` options (the real-text CLI tests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pfi_rag.config import Config, load_config

TINY_FEDERATION = {
    "models.generator": "tiny-random",
    "models.device": "cpu",
    "privacy.local_steps": 2,
    "privacy.batch_size": 4,
    "privacy.max_seq_len": 48,
    "privacy.epsilon_per_round": 4.0,
    "privacy.epsilon_max": 100.0,
}


def tiny_federation_settings(model_cache: Path, **overrides: Any) -> dict[str, Any]:
    """Dotted config keys, as `--set` takes them: :data:`TINY_FEDERATION` and the test model cache."""
    return {**TINY_FEDERATION, "models.cache_dir": str(model_cache), **overrides}


def tiny_federation_config(root: Path, model_cache: Path, **overrides: Any) -> Config:
    return load_config(
        overrides={"data_root": str(root), **tiny_federation_settings(model_cache, **overrides)}
    )


def cli_options(root: Path, settings: dict[str, Any]) -> list[str]:
    """`pfi-rag` global options for a data root and settings: ``--data-root ROOT --set key=value ...``."""
    return ["--data-root", str(root)] + [a for k, v in settings.items() for a in ("--set", f"{k}={v}")]


def captured_dir(root: Path) -> Path:
    """Where :func:`capture_replies` leaves what the clients sent (the launcher's run directory)."""
    from pfi_rag.layout import simulation_dir

    return simulation_dir(root) / "captured"


def capture_replies(msg, context, call_next):
    """A Flower client mod that pickles every reply a client sends, as the server will get it.

    It runs in Flower's own processes (Ray workers): the launcher names it in the run config
    (``client_mods=[capture_replies]``), and it writes under the run directory the config names.
    """
    import pickle

    reply = call_next(msg, context)
    if reply.has_content():
        captured = {
            key: (
                {name: reply.content[key][name].numpy() for name in reply.content[key].keys()}
                if key == "update"
                else dict(reply.content[key])
            )
            for key in reply.content.keys()
        }
        directory = Path(str(context.run_config["run-dir"])) / "captured"
        directory.mkdir(parents=True, exist_ok=True)
        name = f"{msg.metadata.message_type}-{msg.metadata.message_id}.pkl"
        (directory / name).write_bytes(pickle.dumps(captured))
    return reply
