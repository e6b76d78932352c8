"""Presets: named settings that make a whole run (the demo, a benchmark matrix) fit a small CPU.

A preset is a set of config defaults plus the few choices of the run itself (how many seeds, which
probes). Each config field below names the dotted key it sets; ``None`` leaves that key as
configured. The command applies :meth:`Preset.overrides` as defaults, so an explicit ``--set`` of
the same key wins. The demo's presets live in ``cli/end_to_end.py``, the benchmark's in
``benchmark/runs.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from typing import Any


def _sets(key: str, default: Any = None) -> Any:
    """A field that sets the config's dotted ``key`` (left alone while it is None)."""
    return field(default=default, metadata={"key": key})


@dataclass(frozen=True)
class Preset:
    name: str
    # -- config defaults ---------------------------------------------------------------------------
    generator: str | None = _sets("models.generator")
    # One torch thread per process: two Flower clients train side by side on 2 cores, and on a shared
    # machine 2 threads decoded several times slower than 1 (docs/models.md).
    threads: int | None = _sets("models.threads", 1)
    clients: int | None = _sets("federation.clients")
    rounds: int | None = _sets("federation.rounds")
    local_steps: int | None = _sets("privacy.local_steps")  # DP-SGD steps per client per round
    batch_size: int | None = _sets("privacy.batch_size")
    max_seq_len: int | None = _sets("privacy.max_seq_len")  # training tokens per record
    epsilon_per_round: float | None = _sets("privacy.epsilon_per_round")
    # "exact": the federation's view is a plain federation's (exact losses, not the private release).
    round_metrics: str | None = _sets("privacy.round_metrics")
    max_new_tokens: int | None = _sets("serving.max_new_tokens")  # per HTTP answer
    answer_tokens: int | None = _sets("probes.answer_tokens")  # per groundedness answer
    exposure_samples: int | None = _sets("probes.exposure_samples")  # candidates per canary
    cloze_items: int | None = _sets("probes.cloze_items")  # utility items per client
    # -- the run itself ----------------------------------------------------------------------------
    probes: tuple[str, ...] | None = None  # the probes it runs; None: the whole suite
    seeds: int = 1  # runs per benchmark scenario
    tradeoff_epsilons: tuple[float | None, ...] = ()  # benchmark: total epsilon per client; None: non-private

    def overrides(self) -> dict[str, Any]:
        """Dotted config keys, as `--set` gives them, for every config field the preset sets."""
        return {
            f.metadata["key"]: getattr(self, f.name)
            for f in fields(self)
            if "key" in f.metadata and getattr(self, f.name) is not None
        }


__all__ = ["Preset"]
