"""Which adapter serves a client, and a bounded cache of adapters loaded into the one base model.

Resolution, first found wins: the client's own adapter (``clients/<id>/adapter/``), the
federation's shared adapter (``federation/global_adapter/``), the base model. The answer
carries a :class:`ServedAdapter` saying which.

Every loaded adapter lives in the same ``PeftModel`` under a name that includes its version
(``client--alice--v3--7``, the last part counting loads). A newer version on disk is loaded
under a new name beside the old one and becomes current at once; requests already holding
the old one finish with it, and it is deleted when the last of them releases it. So a request
sees the old or the new adapter, never a mix. Least recently used adapters leave when there
are more than ``max_adapters`` or they take more than ``max_bytes``; adapters in use stay.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from peft import PeftModel, get_peft_model

from pfi_rag.config import AdapterConfig
from pfi_rag.layout import client_adapter_dir, global_adapter_dir
from pfi_rag.models.adapters import AdapterInfo, peek_adapter_info
from pfi_rag.models.decoding import BASE_ADAPTER
from pfi_rag.models.gathered_lora import GatheredLoRA, UnsupportedAdapter
from pfi_rag.models.lora import lora_config

logger = logging.getLogger(__name__)

# An identity adapter (LoRA B starts at zero) that makes the model a PeftModel from the start, so
# loading the first real adapter never rewraps a model another thread may be running. No request
# ever names it.
PLACEHOLDER_ADAPTER = "__serving_placeholder__"
# A changed directory during a load is retried this many times before giving up.
LOAD_ATTEMPTS = 3

AdapterKind = Literal["client", "global", "base"]


class AdapterLoadError(RuntimeError):
    """An adapter exists on disk but cannot be loaded; the client is not silently downgraded."""


@dataclass(frozen=True)
class ServedAdapter:
    """Which adapter answered: the client's own, the federation's global one, or none (base)."""

    client_id: str
    kind: AdapterKind
    version: int | None = None
    round: int | None = None

    def as_dict(self) -> dict[str, Any]:
        return {"client": self.client_id, "kind": self.kind, "version": self.version, "round": self.round}


def serving_model(base_model, cfg: AdapterConfig) -> PeftModel:
    """Wrap the base model once for serving: a PeftModel in eval mode, gradients off."""
    model = get_peft_model(base_model, lora_config(cfg), adapter_name=PLACEHOLDER_ADAPTER)
    model.requires_grad_(False)
    return model.eval()


@dataclass(eq=False)
class _Loaded:
    key: tuple[str, str]  # ("client", id) or ("global", "")
    name: str  # the peft adapter name
    info: AdapterInfo
    nbytes: int
    users: int = 0
    current: bool = True  # False once a newer version replaced it
    slot: int | None = None  # its gathered-LoRA slot; None: served through PEFT's own path


class AdapterLease:
    """A request's hold on one adapter: it stays loaded until released."""

    def __init__(self, cache: AdapterCache | None, entry: _Loaded | None, served: ServedAdapter):
        self._cache, self._entry, self.served = cache, entry, served
        self.name = entry.name if entry is not None else BASE_ADAPTER
        # The gathered-LoRA slot decoding uses (0: no adapter; None: PEFT's path only).
        self.slot = entry.slot if entry is not None else 0

    def release(self) -> None:
        if self._cache is not None and self._entry is not None:
            self._cache._release(self._entry)
            self._cache = None

    def __enter__(self) -> AdapterLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class AdapterCache:
    """Loads client and global adapters into ``model`` on demand and pins them while in use.

    ``model_lock`` must be the lock held around forward passes: loading and deleting adapters
    changes the model's modules. With ``gathered``, every loaded adapter also takes a slot there
    (and gives it back when it is deleted), so mixed batches run one gathered product per layer.
    """

    def __init__(
        self,
        model: PeftModel,
        data_root: Path,
        *,
        max_adapters: int,
        max_bytes: int | None = None,
        model_lock: threading.Lock,
        gathered: GatheredLoRA | None = None,
    ):
        self.model = model
        self.gathered = gathered
        self.data_root = Path(data_root)
        self.max_adapters = max_adapters
        self.max_bytes = max_bytes
        self.model_lock = model_lock
        self._lock = threading.Lock()  # guards the bookkeeping below
        self._load_lock = threading.Lock()  # one load at a time, so a client is never loaded twice
        self._current: dict[tuple[str, str], _Loaded] = {}
        self._loaded: OrderedDict[str, _Loaded] = OrderedDict()  # least recently used first
        self._loads = 0
        self._slots: dict[str, int] = {}  # adapter name -> gathered slot

    def resolve(self, client_id: str) -> tuple[tuple[str, str], Path, AdapterInfo] | None:
        """The adapter that should serve ``client_id`` now: (key, directory, info), or None for base."""
        directory = client_adapter_dir(self.data_root, client_id)
        info = peek_adapter_info(directory)
        if info is not None:
            return ("client", client_id), directory, info
        directory = global_adapter_dir(self.data_root)
        info = peek_adapter_info(directory)
        if info is not None:
            return ("global", ""), directory, info
        return None

    def acquire(self, client_id: str) -> AdapterLease:
        """Pin the adapter that serves ``client_id``, loading (or reloading a newer version) if needed."""
        resolved = self.resolve(client_id)
        if resolved is None:
            return AdapterLease(None, None, ServedAdapter(client_id, "base"))
        key, directory, info = resolved
        entry = self._pin_current(key, info)
        if entry is None:
            with self._load_lock:
                entry = self._load(key, directory)
        kind: AdapterKind = "client" if key[0] == "client" else "global"
        return AdapterLease(self, entry, ServedAdapter(client_id, kind, entry.info.version, entry.info.round))

    def _pin_current(self, key: tuple[str, str], info: AdapterInfo) -> _Loaded | None:
        with self._lock:
            entry = self._current.get(key)
            if entry is None or entry.info != info:  # != rather than <: a retrained adapter restarts at 1
                return None
            entry.users += 1
            self._loaded.move_to_end(entry.name)
            return entry

    def _load(self, key: tuple[str, str], directory: Path) -> _Loaded:
        for _ in range(LOAD_ATTEMPTS):
            before = peek_adapter_info(directory)
            if before is None:
                break
            loaded = self._pin_current(key, before)  # another request loaded it while we waited
            if loaded is not None:
                return loaded
            self._loads += 1  # in the name, so two loads of one version never share a name
            name = f"{key[0]}--{key[1] or 'shared'}--v{before.version}--{self._loads}"
            try:
                with self.model_lock:
                    self.model.load_adapter(str(directory), adapter_name=name, is_trainable=False)
                    self.model.eval()
                    self._fill_slot(name)
            except FileNotFoundError:
                continue  # replaced while we read it
            except Exception as exc:
                raise AdapterLoadError(f"cannot load the adapter in {directory}: {exc}") from exc
            if peek_adapter_info(directory) != before:  # a new version landed mid-load: parts may mix
                self._delete(name)
                continue
            return self._install(key, name, before)
        raise AdapterLoadError(f"the adapter in {directory} kept changing or vanished while loading")

    def _install(self, key: tuple[str, str], name: str, info: AdapterInfo) -> _Loaded:
        params = [p for n, p in self.model.named_parameters() if f".{name}." in n]
        nbytes = sum(p.numel() * p.element_size() for p in params)
        entry = _Loaded(key=key, name=name, info=info, nbytes=nbytes, users=1, slot=self._slots.get(name))
        doomed = []
        with self._lock:
            previous = self._current.get(key)
            if previous is not None:
                previous.current = False
                if previous.users == 0:
                    doomed.append(self._loaded.pop(previous.name))
            self._current[key] = entry
            self._loaded[name] = entry
            doomed.extend(self._over_budget())
        for old in doomed:
            self._delete(old.name)
        logger.info("loaded adapter %s (%d bytes)", name, nbytes)
        return entry

    def _over_budget(self) -> list[_Loaded]:
        """Unpinned adapters to evict, least recently used first (call with ``_lock`` held)."""
        evicted = []
        for entry in list(self._loaded.values()):
            count = len(self._loaded)
            nbytes = sum(e.nbytes for e in self._loaded.values())
            if count <= self.max_adapters and (self.max_bytes is None or nbytes <= self.max_bytes):
                break
            if entry.users == 0:
                evicted.append(self._loaded.pop(entry.name))
                if self._current.get(entry.key) is entry:
                    del self._current[entry.key]
        return evicted

    def _release(self, entry: _Loaded) -> None:
        doomed = []
        with self._lock:
            entry.users -= 1
            if entry.users == 0 and not entry.current and entry.name in self._loaded:
                doomed.append(self._loaded.pop(entry.name))
            doomed.extend(self._over_budget())
        for old in doomed:
            self._delete(old.name)

    def _fill_slot(self, name: str) -> None:
        """Copy a just-loaded adapter into a gathered slot (call with ``model_lock`` held)."""
        if self.gathered is None:
            return
        try:
            self._slots[name] = self.gathered.fill(name)
        except UnsupportedAdapter as exc:  # still served, through PEFT's slower mixed path
            logger.warning("adapter %s is served without gathered LoRA: %s", name, exc)

    def _delete(self, name: str) -> None:
        with self.model_lock:
            if name in self.model.peft_config:
                self.model.delete_adapter(name)
            slot = self._slots.pop(name, None)
            if slot is not None:
                self.gathered.clear(slot)
        logger.info("unloaded adapter %s", name)

    def loaded(self) -> list[str]:
        """Names of the adapters in memory, least recently used first."""
        with self._lock:
            return list(self._loaded)
