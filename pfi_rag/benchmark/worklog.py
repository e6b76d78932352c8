"""The benchmark's work log: which runs are done, so a long matrix accumulates over invocations.

The work directory (``<data_root>/bench-silent-failures/``) holds one benchmark's settings at a
time. ``settings.json`` names them by a fingerprint (:func:`fingerprint`: the preset, the world,
the probes and which of them planted runs run, whether clean runs are probed after every round,
and every config value but paths) and lists each invocation. ``runs.jsonl`` gets one line per
finished run, and one per finished trade-off federation, stamped with that fingerprint. A later
invocation with the same settings reuses every finished run it asks for and runs only the rest;
a run cut mid-way left no line and is simply run again. Different settings are refused
(:class:`SettingsChanged`) rather than mixed or silently discarded: hours of runs go only when
asked (``fresh``).

The code is not part of the fingerprint (a matrix of hours may span fixes that do not change what
it measures), but it is never hidden: every run and invocation is stamped with
:func:`code_version`, and the outputs list the versions a result's runs came from.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import shutil
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

from pfi_rag.config import Config
from pfi_rag.storage import atomic_write_json

SETTINGS_FILE = "settings.json"
RUNS_FILE = "runs.jsonl"


def code_version() -> str:
    """A short hash of pfi-rag's own source files: which code made a run, installed or checked out."""
    package = Path(__file__).resolve().parents[1]
    digest = hashlib.sha256()
    for path in sorted(package.rglob("*.py")):
        digest.update(path.relative_to(package).as_posix().encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:12]


class SettingsChanged(ValueError):
    """The work directory holds runs made with other settings; pass ``fresh`` to discard them."""


def fingerprint(
    cfg: Config,
    *,
    preset: str,
    world: str,
    probes: tuple[str, ...],
    probe_rounds: bool,
    planted_probes: str = "all",
) -> str:
    """A short hash of everything that changes what a run measures: paths do not (the data root,
    the model cache), every other config value does, and so does pfi-rag's version."""
    settings = cfg.model_dump(mode="json")
    settings.pop("data_root", None)
    settings.get("models", {}).pop("cache_dir", None)
    try:
        version = metadata.version("pfi-rag")
    except metadata.PackageNotFoundError:
        version = "unknown"
    blob = {
        "preset": preset,
        "world": world,
        "probes": list(probes),
        "probe_rounds": probe_rounds,
        "planted_probes": planted_probes,
        "config": settings,
        "pfi-rag": version,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True).encode()).hexdigest()[:16]


@dataclass
class WorkLog:
    """The work directory's record of settings, invocations and finished runs."""

    directory: Path
    fingerprint: str
    describe: dict[str, Any]  # preset and world, for people reading settings.json
    invocations: list[dict[str, Any]] = field(default_factory=list)
    code: str = field(default_factory=code_version)  # stamped on this invocation and its runs

    @classmethod
    def open(
        cls, directory: Path, fingerprint: str, *, describe: dict[str, Any], command: str, fresh: bool = False
    ) -> WorkLog:
        """Open (or start) the log for one more invocation; ``fresh`` discards the directory first.
        Raises :class:`SettingsChanged` when it holds runs made with other settings."""
        directory = Path(directory)
        if fresh and directory.exists():
            shutil.rmtree(directory)
        log = cls(directory, fingerprint, describe)
        saved = _saved_settings(directory)
        if saved is not None:
            if saved["fingerprint"] != fingerprint:
                raise SettingsChanged(
                    f"{_other_settings(directory, saved, fingerprint)}: pass --fresh to discard "
                    "them, or --data-root to keep them and work elsewhere"
                )
            log.invocations = list(saved["invocations"])
        elif (directory / RUNS_FILE).is_file():
            raise SettingsChanged(
                f"{directory} holds runs whose settings were not recorded: pass --fresh to discard "
                "them, or --data-root to work elsewhere"
            )
        directory.mkdir(parents=True, exist_ok=True)
        log._repair()
        log.invocations.append(
            {"started": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"), "command": command,
             "code": log.code}  # fmt: skip
        )
        log._save()
        return log

    @classmethod
    def read(cls, directory: Path, fingerprint: str) -> WorkLog:
        """The log as it stands, to report on, changing nothing: safe beside a running
        invocation. Raises :class:`SettingsChanged` when ``directory`` holds no runs with these
        settings."""
        directory = Path(directory)
        saved = _saved_settings(directory)
        if saved is None:
            raise SettingsChanged(f"{directory} holds no benchmark runs: run the benchmark first")
        if saved["fingerprint"] != fingerprint:
            raise SettingsChanged(
                f"{_other_settings(directory, saved, fingerprint)}: report on them with the "
                "options they were run with"
            )
        describe = {k: v for k, v in saved.items() if k not in ("fingerprint", "invocations")}
        return cls(directory, fingerprint, describe, invocations=list(saved["invocations"]))

    @property
    def runs_file(self) -> Path:
        return self.directory / RUNS_FILE

    def _save(self) -> None:
        atomic_write_json(
            self.directory / SETTINGS_FILE,
            {"fingerprint": self.fingerprint, **self.describe, "invocations": self.invocations},
        )

    def _repair(self) -> None:
        """Drop a last line cut mid-write (a killed process), so the next line starts clean."""
        if not self.runs_file.is_file():
            return
        data = self.runs_file.read_bytes()
        if data and not data.endswith(b"\n"):
            self.runs_file.write_bytes(data[: data.rfind(b"\n") + 1])

    def _entries(self, kind: str) -> list[dict[str, Any]]:
        if not self.runs_file.is_file():
            return []
        found = []
        for line in self.runs_file.read_text(encoding="utf-8").splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if entry.get("fingerprint") == self.fingerprint and entry.get("kind", "run") == kind:
                found.append(entry)
        return found

    def finished_runs(self) -> dict[tuple[str, int], dict[str, Any]]:
        """Finished matrix runs by (scenario, seed); a run logged twice counts by its last line."""
        return {(run["scenario"], int(run["seed"])): run for run in self._entries("run")}

    def finished_tradeoff(self) -> dict[float | None, dict[str, Any]]:
        """Finished trade-off rows by total epsilon (None: the non-private baseline)."""
        return {row["epsilon"]: row for row in self._entries("tradeoff")}

    def record(self, entry: dict[str, Any], *, kind: str = "run") -> None:
        """Append a finished run (or trade-off row) as one line, stamped with the fingerprint; the
        entry itself gets this invocation's ``code`` version, so results in memory carry it too."""
        entry["code"] = self.code
        line = json.dumps({**entry, "kind": kind, "fingerprint": self.fingerprint}, default=str)
        with self.runs_file.open("a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def finish(self, *, ran: int, reused: int, seconds: float) -> None:
        """Close this invocation's entry: how many runs it made and reused, and its wall time."""
        self.invocations[-1].update(ran=ran, reused=reused, seconds=round(seconds, 1))
        self._save()


def _saved_settings(directory: Path) -> dict[str, Any] | None:
    settings = directory / SETTINGS_FILE
    return json.loads(settings.read_text(encoding="utf-8")) if settings.is_file() else None


def _other_settings(directory: Path, saved: dict[str, Any], fingerprint: str) -> str:
    return (
        f"{directory} holds runs made with other settings (preset {saved['preset']}, "
        f"world {saved['world']}, fingerprint {saved['fingerprint']}; now {fingerprint})"
    )


__all__ = ["RUNS_FILE", "SETTINGS_FILE", "SettingsChanged", "WorkLog", "code_version", "fingerprint"]
