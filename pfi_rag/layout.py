"""Every path under the data root, named once: where each thing pfi-rag keeps on disk lives.

The rest of the package asks this module for a path and never joins directory names itself, so
the tree below is the whole of what a data root can hold (docs/architecture.md shows it too)::

    <data_root>/
      clients/<id>/                         everything of one client, and nothing of another
        data/                               its raw records (*.jsonl; synthetic or imported)
        index/                              its retriever: docstore.sqlite, faiss.index, lock
        split.json                          which of its documents are held out from training
        adapter/                            its LoRA adapter (PEFT format)
        local_adapter/                      the adapter it trained alone (fairness baseline)
        privacy.json                        its privacy ledger
        .privacy.lock                       flocked while a process writes that ledger
        settings.toml                       optional: its own [privacy] settings
        audit/canaries.json                 its audit canaries (privacy.audit_canaries)
        probes/latest.json                  its own latest probe results
        logs/federation.log                 what went wrong on its side of a round
        logs/federation-timings.jsonl       where its rounds' time went, phase by phase
      federation/
        global_adapter/                     the latest global adapter
        rounds/round-0001.json              the record of round 1
        rounds/round-0001/global_adapter/   the global adapter after round 1
        checkpoint/                         the server's resumable state
        summary.json                        the launcher's per-round and per-client table
        deploy/                             `pfi-rag deploy local`: app, config, logs, certificates
        simulation/                         `pfi-rag federate`'s run: app, config, logs/ of Flower and Ray
      shared/                               evaluation sets every client shares (synthetic data)
      manifest.json                         ground truth of the synthetic data
      keys.json                             API key hashes
      server.lock                           held by the one server serving this root
      report/                               the demo's probe report (report.json, report.html)
      answers.json                          the demo's HTTP answers
      logs/libraries.log                    Flower's, Ray's and transformers' output in the demo
      demo/                                 `pfi-rag demo`'s own data root, laid out as this one
      bench-silent-failures/                `pfi-rag bench`'s runs, one data root each, and runs.jsonl
      .pfi-rag-demo.lock                    flocked while a demo rebuilds demo/

Only the standard library is imported: every layer may use this module, and it uses none of
them. Nothing here writes (two functions list directories); :mod:`pfi_rag.storage` writes
atomically.
"""

from __future__ import annotations

import re
from pathlib import Path

CLIENT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")
ROUND_FILE = re.compile(r"round-(\d{4,})\.json")  # a round record's name in rounds_dir

# Inside a client's index directory (a ClientStore opens the directory and names these).
DOCSTORE_FILE = "docstore.sqlite"  # every document version, its chunks and vectors (SQLite)
FAISS_FILE = "faiss.index"  # the vector index, rebuilt from the docstore when missing
STORE_LOCK_FILE = "lock"  # flock held by the one process that has the store open


class InvalidClientId(ValueError):
    """A client id that could escape its directory or is not in the allowed form."""


def validate_client_id(client_id: str) -> str:
    """Return ``client_id`` if it matches ``[a-z0-9][a-z0-9_-]{0,63}``, else raise."""
    if not isinstance(client_id, str) or not CLIENT_ID_PATTERN.fullmatch(client_id):
        shown = client_id if isinstance(client_id, str) and len(client_id) <= 80 else "<id>"
        raise InvalidClientId(
            f"invalid client id {shown!r}: use 1-64 characters of a-z, 0-9, '_' or '-', "
            "starting with a letter or digit"
        )
    return client_id


# -- one client: clients/<id>/ ------------------------------------------------------------------


def clients_dir(data_root: Path) -> Path:
    """``clients/``: one directory per client."""
    return Path(data_root) / "clients"


def list_clients(data_root: Path) -> list[str]:
    """The ids of the client directories that exist, sorted."""
    root = clients_dir(data_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and CLIENT_ID_PATTERN.fullmatch(p.name))


def client_dir(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/``: everything of one client (validates the id; creates nothing)."""
    return clients_dir(data_root) / validate_client_id(client_id)


def client_data_dir(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/data/``: the client's raw records as ``*.jsonl``; they never leave it."""
    return client_dir(data_root, client_id) / "data"


def client_index_dir(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/index/``: the client's retriever (docstore, FAISS index, lock)."""
    return client_dir(data_root, client_id) / "index"


def client_docstore_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/index/docstore.sqlite``: every version of every document of the client."""
    return client_index_dir(data_root, client_id) / DOCSTORE_FILE


def client_store_lock_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/index/lock``: flocked by the process that has the client's store open."""
    return client_index_dir(data_root, client_id) / STORE_LOCK_FILE


def client_split_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/split.json``: the salt and share that decide which documents are held out."""
    return client_dir(data_root, client_id) / "split.json"


def client_adapter_dir(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/adapter/``: the client's LoRA adapter, PEFT format plus a version record."""
    return client_dir(data_root, client_id) / "adapter"


def client_local_adapter_dir(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/local_adapter/``: the adapter the client trained alone (fairness baseline)."""
    return client_dir(data_root, client_id) / "local_adapter"


def client_ledger_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/privacy.json``: the privacy ledger (accountant state, budget, every spend)."""
    return client_dir(data_root, client_id) / "privacy.json"


def client_ledger_lock_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/.privacy.lock``: flocked by the one process writing the client's ledger."""
    return client_dir(data_root, client_id) / ".privacy.lock"


def client_settings_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/settings.toml``: optional, the client's own ``[privacy]`` settings."""
    return client_dir(data_root, client_id) / "settings.toml"


def client_canaries_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/audit/canaries.json``: the client's audit canaries and which were trained on."""
    return client_dir(data_root, client_id) / "audit" / "canaries.json"


def client_probe_results_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/probes/latest.json``: the client's own latest probe results (exact, local)."""
    return client_dir(data_root, client_id) / "probes" / "latest.json"


def client_log_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/logs/federation.log``: warnings and failures of the client's side of rounds."""
    return client_dir(data_root, client_id) / "logs" / "federation.log"


def client_timings_file(data_root: Path, client_id: str) -> Path:
    """``clients/<id>/logs/federation-timings.jsonl``: each round's phase timings (never sent)."""
    return client_dir(data_root, client_id) / "logs" / "federation-timings.jsonl"


# -- the federation: federation/ --------------------------------------------------------------


def federation_dir(data_root: Path) -> Path:
    """``federation/``: what the federation's server keeps."""
    return Path(data_root) / "federation"


def global_adapter_dir(data_root: Path) -> Path:
    """``federation/global_adapter/``: the latest global adapter (served to clients without one)."""
    return federation_dir(data_root) / "global_adapter"


def rounds_dir(data_root: Path) -> Path:
    """``federation/rounds/``: one record (and global adapter) per round."""
    return federation_dir(data_root) / "rounds"


def round_record_file(data_root: Path, round_number: int) -> Path:
    """``federation/rounds/round-NNNN.json``: what happened in that round (a RoundRecord)."""
    return rounds_dir(data_root) / f"round-{round_number:04d}.json"


def round_record_files(data_root: Path) -> list[Path]:
    """The round records that exist, in round order (empty when the federation never ran)."""
    directory = rounds_dir(data_root)
    if not directory.is_dir():
        return []
    found = (ROUND_FILE.fullmatch(p.name) for p in directory.iterdir())
    return [directory / m.group(0) for m in sorted(filter(None, found), key=lambda m: int(m.group(1)))]


def round_adapter_dir(data_root: Path, round_number: int) -> Path:
    """``federation/rounds/round-NNNN/global_adapter/``: the global adapter after that round."""
    return round_adapter_dir_of(round_record_file(data_root, round_number))


def round_adapter_dir_of(record_file: Path) -> Path:
    """The global adapter directory beside a round record file (see :func:`round_adapter_dir`)."""
    return Path(record_file).with_suffix("") / "global_adapter"


def checkpoint_dir(data_root: Path) -> Path:
    """``federation/checkpoint/``: the server's resumable state (arrays.npz + state.json)."""
    return federation_dir(data_root) / "checkpoint"


def summary_file(data_root: Path) -> Path:
    """``federation/summary.json``: the launcher's per-round and per-client table."""
    return federation_dir(data_root) / "summary.json"


def deploy_dir(data_root: Path) -> Path:
    """``federation/deploy/``: what ``pfi-rag deploy local`` runs from (app, config, logs, tls)."""
    return federation_dir(data_root) / "deploy"


def simulation_dir(data_root: Path) -> Path:
    """``federation/simulation/``: the launcher's latest run on Flower's simulation runtime (app,
    config, the files it exchanges with the ServerApp, and ``logs/`` of Flower's and Ray's output)."""
    return federation_dir(data_root) / "simulation"


def simulation_log_dir(data_root: Path) -> Path:
    """``federation/simulation/logs/``: ``superlink.log`` and ``run.log`` (the ServerApp, Ray and the
    ClientApps' workers) of the launcher's latest run."""
    return simulation_dir(data_root) / "logs"


# -- the data root's own files ------------------------------------------------------------------


def shared_dir(data_root: Path) -> Path:
    """``shared/``: evaluation sets every client shares (the synthetic world writes them)."""
    return Path(data_root) / "shared"


def general_eval_file(data_root: Path) -> Path:
    """``shared/general_eval.jsonl``: general texts, for capability and out-of-domain probes."""
    return shared_dir(data_root) / "general_eval.jsonl"


def refusal_prompts_file(data_root: Path) -> Path:
    """``shared/refusal_prompts.jsonl``: prompts a model should refuse, for the safety probes."""
    return shared_dir(data_root) / "refusal_prompts.jsonl"


def manifest_file(data_root: Path) -> Path:
    """``manifest.json``: ground truth of the synthetic data (for probes and benchmarks only)."""
    return Path(data_root) / "manifest.json"


def keys_file(data_root: Path) -> Path:
    """``keys.json``: API key hashes (mode 600), unless ``serving.keys_file`` puts them elsewhere."""
    return Path(data_root) / "keys.json"


def server_lock_file(data_root: Path) -> Path:
    """``server.lock``: flocked by the one server serving this data root (it holds the pid)."""
    return Path(data_root) / "server.lock"


def report_dir(data_root: Path) -> Path:
    """``report/``: the demo's probe report (report.json, report.html)."""
    return Path(data_root) / "report"


def answers_file(data_root: Path) -> Path:
    """``answers.json``: the demo's HTTP answers, as the service returned them."""
    return Path(data_root) / "answers.json"


def library_log_file(data_root: Path) -> Path:
    """``logs/libraries.log``: Flower's, Ray's and transformers' output while the demo runs."""
    return Path(data_root) / "logs" / "libraries.log"


def demo_root(data_root: Path) -> Path:
    """``demo/``: the data root ``pfi-rag demo`` builds its world in, replaced on each run."""
    return Path(data_root) / "demo"


def demo_lock_file(data_root: Path) -> Path:
    """``.pfi-rag-demo.lock``: flocked by the one demo rebuilding ``demo/`` at a time."""
    return Path(data_root) / ".pfi-rag-demo.lock"


def bench_dir(data_root: Path) -> Path:
    """``bench-silent-failures/``: the benchmark's run log and one data root per run, replaced."""
    return Path(data_root) / "bench-silent-failures"
