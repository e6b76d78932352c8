"""What a probe is: a named check of one failure mode, what it needs, and what it returns.

A probe runs either per client (:class:`ClientProbe`: it reads one client's adapter and
data, so in the privacy-preserving mode the client runs it locally and releases only its
noised metrics) or once per federation (:class:`FederationProbe`: it reads server-side
artifacts such as the round history, or crosses clients). The runner gets probes from
:mod:`pfi_rag.probes.registry`, which finds every probe class of this package (one module per
probe), and never needs to know what they measure.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from pfi_rag.probes.context import ProbeContext


class Need(StrEnum):
    BASE_MODEL = "base_model"
    CLIENT_ADAPTER = "client_adapter"
    GLOBAL_ADAPTER = "global_adapter"
    LOCAL_ADAPTER = "local_adapter"  # the client's adapter trained alone (fairness baseline)
    CLIENT_DATA = "client_data"
    MANIFEST = "manifest"
    RETRIEVER = "retriever"
    HISTORY = "federation_history"
    LEDGER = "privacy_ledger"


class Verdict(StrEnum):
    PASS = "pass"
    FAIL = "fail"
    SKIP = "skip"  # something the probe needs is absent; the reason is in the evidence
    ERROR = "error"  # the probe itself crashed: never counts as a pass


class Scope(StrEnum):
    CLIENT = "client"
    FEDERATION = "federation"


@dataclass
class ProbeResult:
    probe: str
    mode: str
    scope: Scope
    client: str | None  # None for a federation-level result
    metric: str
    value: float | None
    threshold: float
    fails_above: bool  # True: value > threshold is a failure; False: value < threshold is
    verdict: Verdict
    evidence: dict[str, Any] = field(default_factory=dict)
    # The values a client may release in the private mode (name -> value), primary first.
    metrics: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["scope"] = str(self.scope)
        data["verdict"] = str(self.verdict)
        return _jsonable(data)


def _jsonable(obj: Any) -> Any:
    """Numpy scalars and arrays to plain Python, NaN/inf to None, so JSON stays strict."""
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return _jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not np.isfinite(obj):
        return None
    return obj


def judge(value: float | None, threshold: float, *, fails_above: bool) -> Verdict:
    if value is None or not np.isfinite(value):
        return Verdict.ERROR
    failed = value > threshold if fails_above else value < threshold
    return Verdict.FAIL if failed else Verdict.PASS


class Probe(ABC):
    """A check of one failure mode. Subclasses set the class attributes and implement ``run``."""

    name: str
    # The failure mode (a row of docs/architecture.md's table, or a privacy/retrieval/federation failure).
    mode: str
    suites: tuple[str, ...]  # CLI suites it belongs to, besides "all"
    needs: tuple[Need, ...]
    metric: str
    fails_above: bool = True
    scope: Scope
    order: int = 1000  # place in the report (the shipped probes: 10-180); ties by name
    # The threshold when the config has no ``probes.<name>_threshold`` key (a probe added as one
    # module); the thresholds file (``probes.thresholds_file``) may still set it by that key.
    default_threshold: float | None = None

    def threshold(self, ctx: ProbeContext) -> float:
        probes = ctx.config.probes
        key = f"{self.name}_threshold"
        if key in type(probes).model_fields:
            return getattr(probes, key)
        return ctx.thresholds.get(self.name, self.default_threshold)

    def result(
        self,
        ctx: ProbeContext,
        value: float | None,
        *,
        client: str | None = None,
        evidence: dict[str, Any] | None = None,
        metrics: dict[str, float] | None = None,
    ) -> ProbeResult:
        threshold = self.threshold(ctx)
        return ProbeResult(
            probe=self.name,
            mode=self.mode,
            scope=self.scope,
            client=client,
            metric=self.metric,
            value=None if value is None else float(value),
            threshold=threshold,
            fails_above=self.fails_above,
            verdict=judge(value, threshold, fails_above=self.fails_above),
            evidence=evidence or {},
            metrics=metrics
            if metrics is not None
            else ({} if value is None else {self.metric: float(value)}),
        )

    def skip(self, ctx: ProbeContext, reason: str, *, client: str | None = None) -> ProbeResult:
        result = self.result(ctx, None, client=client, evidence={"skipped": reason}, metrics={})
        result.verdict = Verdict.SKIP
        return result


class ClientProbe(Probe):
    """Runs on one client's own adapter and data; may run on the client in the private mode."""

    scope = Scope.CLIENT
    # Clipping range of each released metric (private mode); the noise scales with its width.
    bounds: dict[str, tuple[float, float]]

    @abstractmethod
    def run_client(self, ctx: ProbeContext, client_id: str) -> ProbeResult: ...

    def summarize(self, per_client: dict[str, dict[str, float]]) -> dict[str, Any]:
        """Federation-level figures beyond the runner's distribution of the primary metric.

        ``per_client`` maps client -> released metrics (exact in the plain mode, noisy in the
        private one), so a summary never needs more than what clients release.
        """
        return {}


# A federation probe that can tell which clients caused its failure lists them in its evidence
# under this key; the runner reports them as the summary's flagged clients.
FLAGGED_CLIENTS = "flagged_clients"


class FederationProbe(Probe):
    """Runs once over the federation (server-side artifacts, or cross-client evaluation)."""

    scope = Scope.FEDERATION
    # False: it needs one client's data or adapter in another's hands, so the private mode skips it.
    private_ok: bool = True

    @abstractmethod
    def run_federation(self, ctx: ProbeContext, client_ids: list[str]) -> ProbeResult: ...
