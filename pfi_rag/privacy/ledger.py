"""A client's privacy ledger: its budget, its accountant's history, every spend; persisted, enforced.

``clients/<id>/privacy.json`` is the only record of a client's privacy spending. Every mechanism
that reads the client's records is charged here: DP-SGD training (:meth:`PrivacyLedger.commit`),
a round's noised metrics and a private probe release (:meth:`PrivacyLedger.commit_release`).
Epsilon is recomputed from the whole history, so it accumulates across calls, rounds and
process restarts.

A ledger's terms are fixed when its first spend creates it: the budget (``epsilon_max``), the
``delta`` and the accountant. Later configuration (a config file, ``--set``, a client's
settings.toml) seeds new ledgers only and never changes a stored one; raising or lowering a
budget is :meth:`PrivacyLedger.set_budget` (``pfi-rag privacy set-budget``), which is recorded
with its reason. Each spend and budget entry carries a digest chained over the entries before it,
so an edited history shows (:func:`verify_chain`, the ``budget`` probe).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import hashlib
import json
import logging
import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pfi_rag import layout
from pfi_rag.config import PrivacyConfig
from pfi_rag.privacy.accounting import MECHANISMS, History, epsilon_of
from pfi_rag.privacy.errors import BudgetExceeded, PrivacyError
from pfi_rag.storage import atomic_write_json, read_json

logger = logging.getLogger(__name__)

FORMAT = 2
# Room for float rounding when a spend lands exactly on the budget.
BUDGET_SLACK = 1e-9
# Spend kinds, one per mechanism that reads a client's records.
KINDS = ("dp-sgd", "round-metrics", "probe-release")


@dataclass(frozen=True)
class Spend:
    """One mechanism's privacy cost, as recorded after it ran: a training call's noised steps
    ("dp-sgd"), a round's noised metrics ("round-metrics", privacy.round_metrics) or a private
    probe release ("probe-release", privacy.release)."""

    at: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    records: int
    max_grad_norm: float | None  # None for a release (its clipping is in the release's module)
    epsilon_spent: float  # increase of the composed epsilon caused by this call
    epsilon_after: float  # composed epsilon of every spend so far
    kind: str = "dp-sgd"
    digest: str = ""  # chained over every spend before it (chain_digest); "" in format-1 ledgers


@dataclass(frozen=True)
class BudgetEntry:
    """The budget as set when the ledger was created (first entry) or by ``set_budget``."""

    at: str
    epsilon_max: float
    reason: str
    digest: str = ""


def chain_digest(previous: str, entry: dict) -> str:
    """sha256 of the previous entry's digest and this entry's fields (its own digest left out)."""
    fields = {key: value for key, value in entry.items() if key != "digest"}
    payload = previous + json.dumps(fields, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(payload.encode()).hexdigest()


def verify_chain(entries: Sequence[dict]) -> int | None:
    """The 1-based number of the first entry whose digest does not follow from the ones before
    it (an edited, inserted or removed entry), or None when the chain is intact."""
    previous = ""
    for number, entry in enumerate(entries, start=1):
        if entry.get("digest") != chain_digest(previous, entry):
            return number
        previous = entry["digest"]
    return None


def _now() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="seconds")


class PrivacyLedger:
    """The privacy state of one client. Open with :meth:`open`; one instance per training call."""

    def __init__(self, data_root: Path, *, client_id: str, cfg: PrivacyConfig, state: dict | None):
        self.path = layout.client_ledger_file(data_root, client_id)
        self._lock_path = layout.client_ledger_lock_file(data_root, client_id)
        self._adapter_dir = layout.client_adapter_dir(data_root, client_id)  # named in errors only
        self.client_id = client_id
        self._cfg = cfg
        self._load(state or {})

    def _load(self, state: dict, *, warn: bool = True) -> None:
        cfg = self._cfg
        if state and state.get("format") not in (1, FORMAT):
            raise PrivacyError(f"{self.path}: unknown ledger format {state.get('format')!r}")
        mechanism = state.get("accountant", {}).get("mechanism", cfg.accountant)
        if mechanism not in MECHANISMS:
            raise PrivacyError(
                f"client {self.client_id!r}'s ledger was kept with the {mechanism!r} accountant, which "
                f"no longer exists ({', '.join(MECHANISMS)} compose a history; gdp does not); the "
                f"ledger cannot be converted: start the client over with a fresh adapter"
            )
        self.mechanism = mechanism
        self._delta: float | None = state.get("delta")
        self._history: History = [tuple(entry) for entry in state.get("accountant", {}).get("history", [])]
        self._spends = [Spend(**spend) for spend in state.get("spends", [])]
        budget = state.get("budget")
        if budget is None and "epsilon_max" in state:  # format 1: the budget as last written
            budget = [{"at": "", "epsilon_max": state["epsilon_max"], "reason": "format-1 ledger"}]
        self._budget = [BudgetEntry(**entry) for entry in budget or []]
        self.exists = bool(state)
        if self.exists and warn:
            self._warn_if_config_differs()

    def _warn_if_config_differs(self) -> None:
        cfg, stored = self._cfg, self.epsilon_max
        if not math.isclose(cfg.epsilon_max, stored):
            logger.warning(
                "client %r: privacy.epsilon_max = %g is ignored; its ledger's budget is %g (change it "
                "with `pfi-rag privacy set-budget`)",
                self.client_id,
                cfg.epsilon_max,
                stored,
            )
        if self._delta is not None and not math.isclose(cfg.delta, self._delta):
            logger.warning(
                "client %r: privacy.delta = %g is ignored; its ledger was created with delta %g",
                self.client_id,
                cfg.delta,
                self._delta,
            )

    @classmethod
    def open(cls, data_root: Path, client_id: str, cfg: PrivacyConfig) -> PrivacyLedger:
        """Read ``clients/<id>/privacy.json`` (an empty ledger if there is none); writes nothing."""
        state = read_json(layout.client_ledger_file(data_root, client_id))
        return cls(data_root, client_id=client_id, cfg=cfg, state=state)

    # -- reading -------------------------------------------------------------------------------

    @property
    def history(self) -> History:
        return list(self._history)

    @property
    def spends(self) -> list[Spend]:
        return list(self._spends)

    @property
    def budget_history(self) -> list[BudgetEntry]:
        return list(self._budget)

    @property
    def epsilon_max(self) -> float:
        """The budget: as stored in the ledger; ``privacy.epsilon_max`` only for a new ledger."""
        return self._budget[-1].epsilon_max if self._budget else self._cfg.epsilon_max

    @property
    def delta(self) -> float | None:
        """The delta of this client's budget: fixed at the first spend, None before it."""
        return self._delta

    def delta_for(self, records: int | None) -> float:
        """The delta a spend on ``records`` records uses: the ledger's own, else ``privacy.delta``
        (checked against 1/n when the spend knows n; a client-level release does not)."""
        delta = self._delta if self._delta is not None else self._cfg.delta
        return delta if records is None else check_delta(delta, records)

    @property
    def epsilon_spent(self) -> float:
        if self._delta is None:
            return 0.0
        return epsilon_of(self._history, delta=self._delta, mechanism=self.mechanism)

    @property
    def remaining(self) -> float:
        return max(0.0, self.epsilon_max - self.epsilon_spent)

    def epsilon_after(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, delta: float, also: History = ()
    ) -> float:
        """The composed epsilon if a spend of ``steps`` noised steps (and the entries ``also``
        that the same call adds, a metric release) were added to the history."""
        planned = [*self._history, (noise_multiplier, sample_rate, steps), *also]
        return epsilon_of(planned, delta=delta, mechanism=self.mechanism)

    # -- enforcing -----------------------------------------------------------------------------

    def check_remaining(self, epsilon: float | None = None) -> None:
        """Refuse early, before data or models are loaded, when the budget is gone (or below ``epsilon``)."""
        spent = self.epsilon_spent
        wanted = epsilon if epsilon is not None else 0.0
        if spent + wanted > self.epsilon_max + BUDGET_SLACK or spent >= self.epsilon_max:
            self._refuse(spent, spent + wanted)

    def check(
        self, *, noise_multiplier: float, sample_rate: float, steps: int, records: int, also: History = ()
    ) -> float:
        """The composed epsilon after the planned spend; raises :class:`BudgetExceeded` past the budget."""
        delta = self.delta_for(records)
        after = self.epsilon_after(
            noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=delta, also=also
        )
        if after > self.epsilon_max + BUDGET_SLACK:
            self._refuse(self.epsilon_spent, after)
        return after

    def check_absorbed(self, absorbed: float | None) -> None:
        """Refuse to go on training an adapter that has absorbed more epsilon than this ledger
        records: its ledger was deleted or replaced, so the adapter's true spend is unaccounted."""
        if absorbed is None or absorbed <= self.epsilon_spent * (1 + 1e-6) + BUDGET_SLACK:
            return
        raise PrivacyError(
            f"client {self.client_id!r}'s adapter has absorbed epsilon {absorbed:.4g} but its ledger "
            f"records only {self.epsilon_spent:.4g}: the ledger ({self.path.name}) was deleted or "
            "replaced, so further training cannot be accounted. To start over deliberately, remove "
            f"the client's adapter directory ({self._adapter_dir}) and train a fresh one"
        )

    def _refuse(self, spent: float, after: float) -> None:
        left = max(0.0, self.epsilon_max - spent)
        requested = after - spent
        shown = "unbounded (no noise)" if math.isinf(requested) else f"{requested:.4g}"
        raise BudgetExceeded(
            f"client {self.client_id!r}: this would spend epsilon {shown} but only "
            f"{left:.4g} of {self.epsilon_max:g} is left (spent {spent:.4g}); lower the spend "
            "(--epsilon, fewer steps, more noise) or raise the budget deliberately with "
            "`pfi-rag privacy set-budget`",
            epsilon_spent=spent,
            epsilon_max=self.epsilon_max,
            requested=requested,
        )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the client's ledger lock: one writer per client at a time, so checks stay true."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self._lock_path, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PrivacyError(
                    f"client {self.client_id!r} is already training in another process"
                ) from None
            try:
                self._load(read_json(self.path) or {}, warn=False)  # warned at open
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    # -- writing -------------------------------------------------------------------------------

    def set_budget(self, epsilon_max: float, *, reason: str) -> BudgetEntry:
        """Change the budget on purpose; the change and its reason stay in the ledger's history."""
        if not (epsilon_max > 0 and math.isfinite(epsilon_max)):
            raise PrivacyError(f"a budget must be a positive finite epsilon, got {epsilon_max}")
        if not reason.strip():
            raise PrivacyError("say why the budget changes (--reason): it is kept in the ledger")
        with self.locked():
            self._ensure_created()
            entry = BudgetEntry(at=_now(), epsilon_max=epsilon_max, reason=reason)
            entry = self._chained(self._budget, entry)
            self._budget.append(entry)
            atomic_write_json(self.path, self.to_json())
        return entry

    def commit(self, accountant_state: dict, *, records: int, max_grad_norm: float) -> Spend:
        """Record the accountant's state after training (the spend it already made) and save atomically.

        ``accountant_state`` (an Opacus accountant's ``state_dict``) must be this ledger's history
        plus the new steps: the accountant was loaded from the ledger and stepped only by the DP
        optimizer. Its own mechanism does not matter: the ledger's accountant computes epsilon.
        """
        new_history: History = [tuple(entry) for entry in accountant_state["history"]]
        added = _added_steps(self._history, new_history)
        if added is None:
            raise PrivacyError(
                "the accountant's history does not extend the ledger's; refusing to rewrite it"
            )
        return self._append(new_history, added, records=records, max_grad_norm=max_grad_norm, kind="dp-sgd")

    def commit_release(
        self, entry: tuple[float, float, int], *, records: int, kind: str = "round-metrics"
    ) -> Spend:
        """Record a Gaussian release (``(noise_multiplier, 1.0, 1)``) that already ran, and save."""
        if kind not in KINDS or kind == "dp-sgd":
            raise PrivacyError(f"unknown release kind {kind!r}")
        history = [*self._history, tuple(entry)]
        return self._append(history, tuple(entry), records=records, max_grad_norm=None, kind=kind)

    def _append(
        self,
        new_history: History,
        added: tuple[float, float, int],
        *,
        records: int,
        max_grad_norm: float | None,
        kind: str,
    ) -> Spend:
        delta = self.delta_for(records or None)  # 0: a client-level release, n not involved
        before = self.epsilon_spent if self._delta is not None else 0.0
        after = epsilon_of(new_history, delta=delta, mechanism=self.mechanism)
        sigma, rate, steps = added
        spend = Spend(
            at=_now(),
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=steps,
            records=records,
            max_grad_norm=max_grad_norm,
            epsilon_spent=after - before,
            epsilon_after=after,
            kind=kind,
        )
        self._ensure_created()
        self._history, self._delta = new_history, delta
        self._spends.append(self._chained(self._spends, spend))
        atomic_write_json(self.path, self.to_json())
        return spend

    def _ensure_created(self) -> None:
        """Fix the budget at creation: the first write records the configured budget."""
        if not self._budget:
            created = BudgetEntry(
                at=_now(), epsilon_max=self._cfg.epsilon_max, reason="created with privacy.epsilon_max"
            )
            self._budget.append(self._chained([], created))
        self.exists = True

    @staticmethod
    def _chained(entries: list, entry):
        previous = entries[-1].digest if entries else ""
        return type(entry)(**(asdict(entry) | {"digest": chain_digest(previous, asdict(entry))}))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "client_id": self.client_id,
            "accountant": {"mechanism": self.mechanism, "history": [list(entry) for entry in self._history]},
            "delta": self._delta,
            "epsilon_max": self.epsilon_max,
            "epsilon_spent": self.epsilon_spent,
            "budget": [asdict(entry) for entry in self._budget],
            "spends": [asdict(spend) for spend in self._spends],
        }


def check_delta(delta: float, records: int) -> float:
    """``delta`` if it is below 1/n for this client's ``records``; it never depends on n, so it
    says nothing about the client's data, but it must stay below 1/n to mean anything."""
    if records < 1:
        raise PrivacyError("no records to train on")
    if delta >= 1 / records:
        raise PrivacyError(
            f"privacy.delta={delta:g} is not below 1/{records} for this client's {records} records: a "
            f"mechanism that leaks one record in full would satisfy it; set privacy.delta below "
            f"{1 / records:g} (one value for every client, e.g. 1e-6)"
        )
    return delta


def _added_steps(old: History, new: History) -> tuple[float, float, int] | None:
    """The ``(sigma, q, steps)`` ``new`` adds to ``old``; Opacus merges equal consecutive entries."""
    if len(new) < len(old) or new[: max(len(old) - 1, 0)] != old[: max(len(old) - 1, 0)]:
        return None
    if len(new) == len(old):
        if not old:
            return None
        (sigma, rate, steps_new), (sigma_old, rate_old, steps_old) = new[-1], old[-1]
        if (sigma, rate) != (sigma_old, rate_old) or steps_new < steps_old:
            return None
        return sigma, rate, steps_new - steps_old
    if old and new[len(old) - 1] != old[-1]:
        return None
    tail = new[len(old) :]
    if len({(sigma, rate) for sigma, rate, _ in tail}) != 1:
        return None  # a call uses one noise multiplier and one sample rate
    return tail[0][0], tail[0][1], sum(steps for _, _, steps in tail)
