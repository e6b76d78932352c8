"""API keys: issued once, stored only as salted hashes, checked in constant time.

A key reads ``pfi_<key id>_<secret>``. The key id (random, not secret) finds the record; the
secret (32 random bytes) is checked against ``HMAC-SHA256(salt, secret)``. A fast hash is
enough here: the secret has 256 bits of entropy, so there is nothing to brute-force, and a slow
hash (scrypt) would cost tens of milliseconds on every request. The keys file
(``<data_root>/keys.json`` by default) is written atomically under a file lock, and re-read
when it changes on disk, so ``pfi-rag clients create`` takes effect on a running server.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import hmac
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pfi_rag import layout
from pfi_rag.layout import validate_client_id
from pfi_rag.storage import atomic_write_json, read_json

FORMAT = 1
PREFIX = "pfi"
ADMIN = "admin"  # the name admin keys are listed under; never a client's resources


class KeyStoreError(ValueError):
    """A key cannot be created or revoked as asked; the message says why."""


@dataclass(frozen=True)
class KeyRecord:
    """What the keys file holds for one key: never the key itself."""

    key_id: str
    client_id: str | None  # None for an admin key
    admin: bool
    salt: str
    digest: str
    created_at: str

    def public(self) -> dict:
        return {
            "key_id": self.key_id,
            "client_id": self.client_id,
            "admin": self.admin,
            "created_at": self.created_at,
        }


@dataclass(frozen=True)
class Principal:
    """Who a request authenticated as."""

    key_id: str
    client_id: str | None
    admin: bool


def _digest(salt: str, secret: str) -> str:
    return hmac.new(bytes.fromhex(salt), secret.encode("utf-8"), hashlib.sha256).hexdigest()


class KeyStore:
    """The keys file: create, list and revoke keys, and authenticate a presented key."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._stamp: tuple[int, int] | None = None
        self._records: dict[str, KeyRecord] = {}

    # -- reading ---------------------------------------------------------------------------

    def _load(self) -> dict[str, KeyRecord]:
        """The records, re-read only when the file changed (one stat per request)."""
        try:
            stat = self.path.stat()
            stamp = (stat.st_mtime_ns, stat.st_ino)
        except FileNotFoundError:
            stamp = None
        with self._lock:
            if stamp != self._stamp or stamp is None:
                state = read_json(self.path, {"format": FORMAT, "keys": []})
                if state.get("format") != FORMAT:
                    raise ValueError(f"{self.path}: unknown keys file format {state.get('format')!r}")
                self._records = {r["key_id"]: KeyRecord(**r) for r in state["keys"]}
                self._stamp = stamp
            return self._records

    def records(self) -> list[KeyRecord]:
        return sorted(self._load().values(), key=lambda r: (r.client_id or "", r.created_at))

    def authenticate(self, presented: str) -> Principal | None:
        """The key's owner, or None for anything that is not a live key (same cost either way)."""
        parts = presented.split("_", 2) if isinstance(presented, str) else []
        key_id, secret = (parts[1], parts[2]) if len(parts) == 3 and parts[0] == PREFIX else ("", "")
        record = self._load().get(key_id)
        # Compare against a dummy record when the id is unknown, so timing does not tell them apart.
        salt, digest = (record.salt, record.digest) if record else ("00" * 16, "0" * 64)
        matches = hmac.compare_digest(_digest(salt, secret), digest)
        if record is None or not matches:
            return None
        return Principal(key_id=record.key_id, client_id=record.client_id, admin=record.admin)

    # -- writing ---------------------------------------------------------------------------

    @contextmanager
    def _editing(self) -> Iterator[dict[str, KeyRecord]]:
        """Read-modify-write under an exclusive file lock (the CLI and a server may both write)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{self.path.name}.lock"), "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            self._stamp = None
            records = dict(self._load())
            yield records
            atomic_write_json(self.path, {"format": FORMAT, "keys": [asdict(r) for r in records.values()]})
            self.path.chmod(0o600)
            self._stamp = None

    def create(
        self, client_id: str | None, *, admin: bool = False, replace: bool = False
    ) -> tuple[str, KeyRecord]:
        """Issue a key for ``client_id`` (or an admin key); returns (the key, shown once; its record)."""
        if admin == (client_id is not None):
            raise KeyStoreError("give a client id, or ask for an admin key, not both")
        if client_id is not None:
            validate_client_id(client_id)
            if client_id == ADMIN:  # `clients revoke admin` means every admin key
                raise KeyStoreError(f"{ADMIN!r} is reserved for admin keys; choose another client id")
        key_id = secrets.token_hex(6)
        secret = secrets.token_urlsafe(32)
        salt = secrets.token_hex(16)
        record = KeyRecord(
            key_id=key_id,
            client_id=client_id,
            admin=admin,
            salt=salt,
            digest=_digest(salt, secret),
            created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        )
        with self._editing() as records:
            existing = [r for r in records.values() if not admin and r.client_id == client_id]
            if existing and not replace:
                raise KeyStoreError(
                    f"client {client_id!r} already has a key; use `pfi-rag clients rotate {client_id}` "
                    "to replace it"
                )
            for old in existing:
                del records[old.key_id]
            records[key_id] = record
        return f"{PREFIX}_{key_id}_{secret}", record

    def revoke(self, client_id: str) -> int:
        """Remove every key of ``client_id`` (or every admin key for ``"admin"``); returns how many."""
        with self._editing() as records:
            doomed = [
                r.key_id
                for r in records.values()
                if (r.admin and client_id == ADMIN) or (not r.admin and r.client_id == client_id)
            ]
            for key_id in doomed:
                del records[key_id]
        return len(doomed)

    def client_ids(self) -> set[str]:
        return {r.client_id for r in self._load().values() if r.client_id is not None}


def keys_path(data_root: Path, keys_file: Path | None) -> Path:
    return Path(keys_file) if keys_file is not None else layout.keys_file(data_root)
