"""The federation on Flower's simulation runtime, run the way ``flwr run`` runs a local simulation.

A private SuperLink in simulation mode (``flower-superlink --simulation --isolation subprocess``)
on a free loopback port, with its state in memory; ``flwr run --stream`` submits the app (the
ServerApp and ClientApp of the installed pfi_rag package, :mod:`pfi_rag.federation.processes`)
with a run config naming the pfi-rag config, and a federation config giving one virtual
SuperNode per client, one CPU each (and a share of the GPU with ``models.device = cuda``).
Flower then runs the ServerApp in ``flwr-serverapp`` and the ClientApps in Ray workers under
``flwr-simulation``: nothing of theirs runs in this process, and nothing they print reaches its
terminal. Their output goes to ``federation/simulation/logs/``: ``superlink.log`` (every Flower
process, Ray and its workers) and ``run.log`` (the run's own log, as ``flwr log`` shows it).

The launcher learns what happened from disk, as the probes do: each round's record under
``federation/rounds/`` and the files of :mod:`pfi_rag.federation.run_dir`.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from pfi_rag import layout
from pfi_rag.config import Config
from pfi_rag.federation import run_dir as exchange
from pfi_rag.federation.global_adapter import TEMPLATE, write_template
from pfi_rag.federation.processes import (
    APPS,
    CONNECTION,
    FlowerProcessFailed,
    flower_bin,
    flower_env,
    free_port,
    managed_process,
    run_config_file,
    run_status,
    superlink_command,
    wait_for_port,
    write_run_files,
)
from pfi_rag.federation.records import RoundRecord, read_round_record

logger = logging.getLogger(__name__)
# Flower's and Ray's output, relayed line by line from the log files at INFO: the CLI shows it
# with --verbose, the demo files it in its library log, and by default nobody reads it twice.
relay = logger.getChild("flower")

POLL_S = 0.2  # how often the launcher looks for a new round record


@dataclass
class SimulationRun:
    """What one launch did: its new round records, where its logs are, and where its time went."""

    records: list[RoundRecord] = field(default_factory=list)
    log_dir: Path | None = None
    status: dict = field(default_factory=dict)  # the run's row from `flwr ls`
    error: dict | None = None  # why the ServerApp ended the run (:func:`run_dir.read_error`)
    started_at: float = 0.0  # when the SuperLink was started (time.time(), comparable across processes)
    superlink_s: float | None = None  # SuperLink start until it listened
    submitted_s: float | None = None  # SuperLink start until `flwr run` had submitted the run
    first_record_s: float | None = None  # SuperLink start until the first round's record appeared


def federation_config(cfg: Config, clients: int) -> str:
    """``flwr run --federation-config``: one virtual SuperNode per client, one CPU each.

    On 2 cores two clients train at a time. With ``models.device = cuda`` the clients share the
    GPU (Ray hides the GPU from a worker that asks for none, and the model would find no CUDA).
    """
    gpus = 1.0 / clients if cfg.models.device == "cuda" else 0.0
    return (
        f"num-supernodes={clients} client-resources-num-cpus=1 client-resources-num-gpus={gpus} "
        "init-args-logging-level='WARNING' init-args-log-to-driver=true"
    )


def run_apps(
    cfg: Config,
    participants: list[str],
    *,
    client_mods: list[str] = (),
    on_round: Callable[[RoundRecord], None] | None = None,
    timeout_s: float = 24 * 3600.0,
    apps: tuple[str, str] = APPS,
) -> SimulationRun:
    """Run the federation over ``participants`` (one virtual SuperNode each, in this order).

    ``client_mods``: ``module:attribute`` names of Flower client mods (the run config's
    ``client-mods``). ``on_round(record)`` runs here for each new successful round, and the
    ServerApp waits for it before the next round starts. Processes are stopped on any exit.
    ``apps``: the ServerApp and ClientApp, as ``module:attribute`` (default: pfi-rag's).
    Raises :class:`FlowerProcessFailed` when the run did not complete; a ServerApp's own failure
    is returned in ``error`` (:func:`pfi_rag.federation.run_dir.read_error`) for the caller.
    """
    base = layout.simulation_dir(cfg.data_root)
    shutil.rmtree(base, ignore_errors=True)  # the latest run's files and logs only
    log_dir = layout.simulation_log_dir(cfg.data_root)
    port = free_port()
    app_dir, config_file, flwr_home = write_run_files(cfg, base, f"127.0.0.1:{port}", apps=apps)
    if apps == APPS:  # the fresh adapter, from this process's model, so the ServerApp loads none
        write_template(cfg, base / TEMPLATE)
    exchange.write_participants(base, participants)
    run_config = run_config_file(
        base / "run-config.toml",
        {
            "data-root": str(cfg.data_root),
            "config-file": str(config_file),
            "run-dir": str(base),
            "client-mods": " ".join(client_mods),
            "hold-rounds": on_round is not None,
            "launcher-pid": os.getpid(),
        },
    )
    env = flower_env(flwr_home)
    # Flower's processes import the client mods by name: let them import what this process can.
    env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p and Path(p).is_dir())
    run = SimulationRun(log_dir=log_dir)
    before = _record_stamps(cfg.data_root)
    seen: set[int] = set()
    started, run.started_at = time.monotonic(), time.time()
    with ExitStack() as stack:
        # In this process's group: a Ctrl-C or a kill of the launcher's group reaches it too, and
        # Flower's SuperExec, ServerApp and simulation processes exit with their parent.
        superlink_log = log_dir / "superlink.log"
        command = superlink_command(port, None, simulation=True)
        superlink = stack.enter_context(managed_process(command, superlink_log, env, own_session=False))
        wait_for_port(port, superlink, superlink_log)
        run.superlink_s = time.monotonic() - started
        submit = [flower_bin("flwr"), "run", str(app_dir), CONNECTION, "--stream"]
        submit += [
            "--run-config",
            str(run_config),
            "--federation-config",
            federation_config(cfg, len(participants)),
        ]
        # `--stream` follows the run's log until the run ends: when this process exits, the run is over.
        follower = stack.enter_context(managed_process(submit, log_dir / "run.log", env, own_session=False))
        run.submitted_s = time.monotonic() - started
        deadline = started + timeout_s
        relayed = {superlink_log: 0, log_dir / "run.log": 0}
        while True:
            finished = follower.poll() is not None
            _relay(relayed)
            for record in _new_records(cfg.data_root, before, seen):
                if run.first_record_s is None:
                    run.first_record_s = time.monotonic() - started
                run.records.append(record)
                if on_round is not None:
                    on_round(record)
                    exchange.acknowledge_round(base, record.round)
            if finished:
                break
            if superlink.poll() is not None:
                raise FlowerProcessFailed(
                    f"the SuperLink exited with {superlink.returncode}; see {superlink_log}"
                )
            if time.monotonic() > deadline:
                raise FlowerProcessFailed(
                    f"the run did not finish within {timeout_s:.0f} s; logs in {log_dir}"
                )
            time.sleep(POLL_S)
        run.error = exchange.read_error(base)
        if exchange.finished(base):
            run.status = {"status": "finished:completed"}
        elif run.error is not None:
            run.status = {"status": "finished:failed"}
        else:  # the ServerApp said nothing: ask Flower how the one run on this SuperLink ended
            run.status = run_status(None, env)
    if run.status.get("status") != "finished:completed" and run.error is None:
        raise FlowerProcessFailed(
            f"the Flower run ended {run.status.get('status', 'without a status')}: "
            f"{run.status.get('status-details', '')}; logs in {log_dir}"
        )
    return run


def _relay(offsets: dict[Path, int]) -> None:
    """Log the whole lines added to each file since its offset (kept in ``offsets``)."""
    if not relay.isEnabledFor(logging.INFO):
        return
    for path, offset in offsets.items():
        try:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read()
        except FileNotFoundError:
            continue
        complete = data[: data.rfind(b"\n") + 1]
        offsets[path] = offset + len(complete)
        for line in complete.decode("utf-8", "replace").splitlines():
            if line.strip():
                relay.info("%s: %s", path.stem, line)


def _record_stamps(data_root: Path) -> dict[Path, int]:
    return {path: path.stat().st_mtime_ns for path in layout.round_record_files(data_root)}


def _new_records(data_root: Path, before: dict[Path, int], seen: set[int]) -> list[RoundRecord]:
    """Successful round records written since ``before`` and not yet in ``seen``, in round order.

    A failed round's record is left out, as the ServerApp's round loop leaves it out of its own.
    Records are written atomically (temp file + rename), so a record seen is a whole one.
    """
    found = []
    for path in layout.round_record_files(data_root):
        try:
            stamp = path.stat().st_mtime_ns
        except FileNotFoundError:
            continue
        if before.get(path) == stamp:
            continue
        record = read_round_record(path)
        if record.round in seen or record.status != "ok":
            continue
        seen.add(record.round)
        found.append(record)
    return found
