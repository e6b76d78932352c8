"""Where each client's data lives on disk, and how it is written so a crash loses nothing.

Layout under the data root (docs/architecture.md)::

    clients/<id>/index/       FAISS index + document store
    clients/<id>/adapter/     PEFT-format LoRA adapter
    clients/<id>/privacy.json accountant state + budget
    clients/<id>/probes/      local probe results

Every write goes to a temporary file in the same directory, is fsynced, then renamed over
the target: readers see the old or the new file, never half of one.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

CLIENT_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9_-]{0,63}")


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


def clients_root(data_root: Path) -> Path:
    return Path(data_root) / "clients"


def client_dir(data_root: Path, client_id: str) -> Path:
    """The directory that holds everything of one client (not created here)."""
    return clients_root(data_root) / validate_client_id(client_id)


def list_clients(data_root: Path) -> list[str]:
    root = clients_root(data_root)
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if p.is_dir() and CLIENT_ID_PATTERN.fullmatch(p.name))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path, default: Any = None) -> Any:
    path = Path(path)
    if not path.exists():
        return default
    return json.loads(path.read_text(encoding="utf-8"))


@contextmanager
def atomic_directory(target: Path) -> Iterator[Path]:
    """Yield a temporary sibling directory; on success it replaces ``target`` whole.

    Directory renames are atomic only when the target does not exist, so an existing target
    is first moved aside and removed after the swap. A crash between the two renames leaves
    ``target`` missing and ``<target>.old-*`` intact; :func:`recover_directory` restores it.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"))
    try:
        yield staging
        for child in staging.rglob("*"):
            if child.is_file():
                with open(child, "rb") as handle:
                    os.fsync(handle.fileno())
        old = None
        if target.exists():
            old = target.with_name(f"{target.name}.old-{os.getpid()}")
            os.replace(target, old)
        os.replace(staging, target)
        _fsync_dir(target.parent)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def recover_directory(target: Path) -> None:
    """Undo a swap interrupted between its two renames (see :func:`atomic_directory`)."""
    target = Path(target)
    if target.exists():
        for leftover in target.parent.glob(f"{target.name}.old-*"):
            shutil.rmtree(leftover, ignore_errors=True)
        return
    leftovers = sorted(target.parent.glob(f"{target.name}.old-*"))
    if leftovers:
        os.replace(leftovers[-1], target)
