"""What the launcher and the Flower apps it starts tell each other, as files in the run directory.

The ServerApp and the ClientApps run in Flower's own processes (``flwr-serverapp``,
``flwr-simulation`` and its Ray workers), so nothing passes between them and the launcher as a
Python object. The launcher names the run directory in the run config (``run-dir``); there:

- ``participants.json``: the clients in partition order (the n-th virtual SuperNode is the n-th);
- ``error.json``: why the ServerApp ended the run (a FederationFailed's message, or a crash);
- ``finished``: the ServerApp ran every round (without it or an error, the launcher asks Flower);
- ``round-NNNN.ack``: the launcher has handled round N's record; with ``hold-rounds`` the
  ServerApp waits for it before round N+1, so a per-round callback sees round N's state.

The run config's ``launcher-pid`` lets the ServerApp end its process when the launcher dies
(:func:`watch_launcher`).

A deployment (SuperNodes, ``flwr run`` by hand) leaves ``run-dir`` empty and uses none of this.
Imports neither Flower nor torch: cheap for the launcher, which needs neither.
"""

from __future__ import annotations

import json
import os
import threading
import time
from pathlib import Path

from pfi_rag.storage import atomic_write_json, atomic_write_text

PARTICIPANTS = "participants.json"
ERROR = "error.json"
FINISHED = "finished"


def write_participants(run_dir: Path, clients: list[str]) -> None:
    atomic_write_json(Path(run_dir) / PARTICIPANTS, {"clients": clients})


def read_participants(run_dir: Path) -> list[str]:
    return list(json.loads((Path(run_dir) / PARTICIPANTS).read_text(encoding="utf-8"))["clients"])


def write_error(run_dir: Path, exc: BaseException) -> None:
    atomic_write_json(Path(run_dir) / ERROR, {"type": type(exc).__name__, "message": str(exc)})


def read_error(run_dir: Path) -> dict | None:
    """``{"type": ..., "message": ...}`` when the ServerApp failed, else None."""
    path = Path(run_dir) / ERROR
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def watch_launcher(pid: int, poll_s: float = 0.2) -> threading.Thread:
    """End this process the moment the launcher ``pid`` is gone (killed, even with SIGKILL).

    Flower's processes run in sessions of their own, out of reach of a signal to the launcher's
    process group, and each notices its own parent's death only after its children's work is
    done: a ServerApp left running would go on writing rounds that the next launcher resumes.
    """

    def watch() -> None:
        import psutil

        while _alive(pid):
            time.sleep(poll_s)
        # This process's own children first (Ray's head processes, agents and workers), as a
        # kill of the launcher's process group would have ended them with it.
        for child in psutil.Process().children(recursive=True):
            try:
                child.kill()
            except psutil.Error:
                pass
        os._exit(1)  # no clean-up: nothing of this run may be written after the launcher died

    thread = threading.Thread(target=watch, name="launcher-watch", daemon=True)
    thread.start()
    return thread


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # a killed launcher not yet reaped by its parent is a zombie: dead all the same
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return True


def mark_finished(run_dir: Path) -> None:
    """The ServerApp ran every round: the launcher need not ask Flower how the run ended."""
    atomic_write_text(Path(run_dir) / FINISHED, "")


def finished(run_dir: Path) -> bool:
    return (Path(run_dir) / FINISHED).is_file()


def _ack_file(run_dir: Path, round_number: int) -> Path:
    return Path(run_dir) / f"round-{round_number:04d}.ack"


def acknowledge_round(run_dir: Path, round_number: int) -> None:
    atomic_write_text(_ack_file(run_dir, round_number), "")


def wait_for_ack(run_dir: Path, round_number: int, timeout_s: float, poll_s: float = 0.1) -> bool:
    """Wait until the launcher acknowledged ``round_number``; False if ``timeout_s`` passed first.

    The launcher's per-round work (a probe suite on a real model) may take minutes; if the
    launcher dies, Flower stops this process with it, so the wait never outlives it.
    """
    deadline = time.monotonic() + timeout_s
    path = _ack_file(run_dir, round_number)
    while not path.exists():
        if time.monotonic() > deadline:
            return False
        time.sleep(poll_s)
    return True
