"""Read the federation's round history, through the type the federation writes it with.

Layout under the data root (written by ``pfi_rag.federation``; read-only here)::

    federation/rounds/round-0001.json                 a RoundRecord (pfi_rag/federation/records.py)
    federation/rounds/round-0001/global_adapter/      PEFT-format global adapter after round 1

Missing optional fields read as empty; a round file that is not JSON, lacks ``round`` or has a
key the record does not know is an error naming the file, because a probe that silently skipped
a round (or a renamed field) would hide exactly the failures it is meant to find.

Importing this module imports neither Flower nor Ray: ``pfi_rag.federation.records`` is plain
pydantic.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import ConfigDict

from pfi_rag import layout
from pfi_rag.federation.records import RecordError, RoundRecord, read_round_record

HistoryError = RecordError  # a round file is unreadable or malformed; the message names the file


class Round(RoundRecord):
    """A round record as the probes see it, with where it was read from and its global adapter."""

    model_config = ConfigDict(frozen=True)

    path: Path
    adapter_dir: Path | None = None  # the global adapter after this round, when saved

    @property
    def number(self) -> int:
        return self.round


def read_round(path: Path) -> Round:
    record = read_round_record(path)
    adapter = layout.round_adapter_dir_of(path)
    return Round(
        **dict(record),
        path=Path(path),
        adapter_dir=adapter if (adapter / "adapter_config.json").is_file() else None,
    )


def read_history(data_root: Path) -> list[Round]:
    """Every recorded round, in round order (empty when the federation never ran)."""
    return [read_round(path) for path in layout.round_record_files(data_root)]
