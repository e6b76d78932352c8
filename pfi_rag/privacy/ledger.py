"""A client's privacy ledger: the accountant's state and every spend, persisted and enforced.

``clients/<id>/privacy.json`` holds the Opacus accountant's ``state_dict`` (the composed history
of ``(noise_multiplier, sample_rate, steps)``), the delta fixed at the first spend, and a record
of each spend. Epsilon is recomputed from the history, so it accumulates across calls, rounds and
process restarts. Only :meth:`PrivacyLedger.commit` (with the accountant that the DP optimizer
stepped, after training) and :meth:`PrivacyLedger.commit_release` (a round's noised metrics)
write; :meth:`PrivacyLedger.check` refuses a spend that would pass ``epsilon_max`` before any
data is touched.
"""

from __future__ import annotations

import datetime as dt
import fcntl
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from pfi_rag.config import PrivacyConfig
from pfi_rag.privacy.accounting import History, epsilon_of
from pfi_rag.privacy.errors import BudgetExceeded, PrivacyError
from pfi_rag.storage import atomic_write_json, client_dir, read_json

LEDGER_FILE = "privacy.json"
LOCK_FILE = ".privacy.lock"
FORMAT = 1
# Room for float rounding when a spend lands exactly on the budget.
BUDGET_SLACK = 1e-9


@dataclass(frozen=True)
class Spend:
    """One mechanism's privacy cost, as recorded after it ran: a training call's noised steps
    ("dp-sgd") or a round's noised metrics ("round-metrics", privacy.round_metrics)."""

    at: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    records: int
    max_grad_norm: float | None  # None for a metric release (its clipping is in round_metrics)
    epsilon_spent: float  # increase of the composed epsilon caused by this call
    epsilon_after: float  # composed epsilon of every spend so far
    kind: str = "dp-sgd"


class PrivacyLedger:
    """The privacy state of one client. Open with :meth:`open`; one instance per training call."""

    def __init__(self, path: Path, *, client_id: str, cfg: PrivacyConfig, state: dict | None):
        state = state or {}
        if state and state.get("format") != FORMAT:
            raise PrivacyError(f"{path}: unknown ledger format {state.get('format')!r}")
        mechanism = state.get("accountant", {}).get("mechanism", cfg.accountant)
        if mechanism != cfg.accountant:
            raise PrivacyError(
                f"client {client_id!r}'s ledger was kept with the {mechanism!r} accountant; set "
                f"privacy.accountant = {mechanism!r} (epsilons of different accountants do not compose)"
            )
        stored_delta = state.get("delta")
        if stored_delta is not None and cfg.delta is not None and not math.isclose(stored_delta, cfg.delta):
            raise PrivacyError(
                f"client {client_id!r}'s budget was set with delta={stored_delta:g}; privacy.delta="
                f"{cfg.delta:g} would change the meaning of epsilon already spent: unset it or use "
                f"{stored_delta:g}"
            )
        self.path = path
        self.client_id = client_id
        self.mechanism = mechanism
        self.epsilon_max = cfg.epsilon_max
        self._configured_delta = cfg.delta
        self._delta: float | None = stored_delta
        self._history: History = [tuple(entry) for entry in state.get("accountant", {}).get("history", [])]
        self._spends = [Spend(**spend) for spend in state.get("spends", [])]

    @classmethod
    def open(cls, data_root: Path, client_id: str, cfg: PrivacyConfig) -> PrivacyLedger:
        """Read ``clients/<id>/privacy.json`` (an empty ledger if there is none); writes nothing."""
        path = client_dir(data_root, client_id) / LEDGER_FILE
        return cls(path, client_id=client_id, cfg=cfg, state=read_json(path))

    # -- reading -------------------------------------------------------------------------------

    @property
    def history(self) -> History:
        return list(self._history)

    @property
    def spends(self) -> list[Spend]:
        return list(self._spends)

    @property
    def delta(self) -> float | None:
        """The delta of this client's budget: fixed at the first spend, None before it."""
        return self._delta

    def delta_for(self, records: int) -> float:
        """The delta a spend on ``records`` records uses: the ledger's own once it has one."""
        return resolve_delta(self._delta, self._configured_delta, records)

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

    def _refuse(self, spent: float, after: float) -> None:
        left = max(0.0, self.epsilon_max - spent)
        requested = after - spent
        shown = "unbounded (no noise)" if math.isinf(requested) else f"{requested:.4g}"
        raise BudgetExceeded(
            f"client {self.client_id!r}: this training would spend epsilon {shown} but only "
            f"{left:.4g} of {self.epsilon_max:g} is left (spent {spent:.4g}); lower the spend "
            "(--epsilon, fewer steps, more noise) or raise privacy.epsilon_max deliberately",
            epsilon_spent=spent,
            epsilon_max=self.epsilon_max,
            requested=requested,
        )

    @contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the client's ledger lock: one training per client at a time, so checks stay true."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.parent / LOCK_FILE, "w") as handle:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise PrivacyError(
                    f"client {self.client_id!r} is already training in another process"
                ) from None
            try:
                self._reload()
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)

    def _reload(self) -> None:
        state = read_json(self.path) or {}
        self._history = [tuple(entry) for entry in state.get("accountant", {}).get("history", [])]
        self._spends = [Spend(**spend) for spend in state.get("spends", [])]
        self._delta = state.get("delta", self._delta)

    # -- writing -------------------------------------------------------------------------------

    def commit(self, accountant_state: dict, *, records: int, max_grad_norm: float) -> Spend:
        """Record the accountant's state after training (the spend it already made) and save atomically.

        ``accountant_state`` must be this ledger's history plus the new steps: the accountant was
        loaded from the ledger and stepped only by the DP optimizer.
        """
        if accountant_state["mechanism"] != self.mechanism:
            raise PrivacyError(f"accountant {accountant_state['mechanism']!r} is not {self.mechanism!r}")
        new_history: History = [tuple(entry) for entry in accountant_state["history"]]
        added = _added_steps(self._history, new_history)
        if added is None:
            raise PrivacyError(
                "the accountant's history does not extend the ledger's; refusing to rewrite it"
            )
        return self._append(new_history, added, records=records, max_grad_norm=max_grad_norm, kind="dp-sgd")

    def commit_release(self, entry: tuple[float, float, int], *, records: int) -> Spend:
        """Record a metric release (``round_metrics.release_entry``) that already ran, and save."""
        history = [*self._history, entry]
        return self._append(history, entry, records=records, max_grad_norm=None, kind="round-metrics")

    def _append(
        self,
        new_history: History,
        added: tuple[float, float, int],
        *,
        records: int,
        max_grad_norm: float | None,
        kind: str,
    ) -> Spend:
        delta = self.delta_for(records)
        before = self.epsilon_spent if self._delta is not None else 0.0
        after = epsilon_of(new_history, delta=delta, mechanism=self.mechanism)
        sigma, rate, steps = added
        spend = Spend(
            at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            noise_multiplier=sigma,
            sample_rate=rate,
            steps=steps,
            records=records,
            max_grad_norm=max_grad_norm,
            epsilon_spent=after - before,
            epsilon_after=after,
            kind=kind,
        )
        self._history, self._delta = new_history, delta
        self._spends.append(spend)
        atomic_write_json(self.path, self.to_json())
        return spend

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "client_id": self.client_id,
            "accountant": {"mechanism": self.mechanism, "history": [list(entry) for entry in self._history]},
            "delta": self._delta,
            "epsilon_max": self.epsilon_max,
            "epsilon_spent": self.epsilon_spent,
            "spends": [asdict(spend) for spend in self._spends],
        }


def resolve_delta(stored: float | None, configured: float | None, records: int) -> float:
    """The budget's delta: as stored, else as configured, else 1/(10 n); always below 1/n."""
    delta = stored or configured or 1 / (10 * records)
    if delta >= 1 / records:
        raise PrivacyError(
            f"delta={delta:g} is not below 1/{records} records: a mechanism that leaks one record "
            f"in full would satisfy it; set privacy.delta below {1 / records:g}"
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
