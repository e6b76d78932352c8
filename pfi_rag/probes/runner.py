"""Run the probes of a suite over clients and the federation, plainly or privately.

``run_suite(ctx, suite=..., clients=..., private=...)`` is the one entry point (the CLI and
tests call it). Client probes run once per client; the federation summary of each is the
distribution of its primary metric (worst client, percentiles, spread) plus what the probe's
``summarize`` adds. In the private mode (release.py) the summary is computed only from each
client's noised release, per-client exact results stay in ``clients/<id>/probes/latest.json``
on the client, and federation probes that would move one client's data or adapter to another
are skipped.
"""

from __future__ import annotations

import datetime as dt
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pfi_rag.layout import client_probe_results_file
from pfi_rag.models.loading import torch_threads
from pfi_rag.privacy.errors import PrivacyError
from pfi_rag.probes.base import (
    FLAGGED_CLIENTS,
    ClientProbe,
    FederationProbe,
    Probe,
    ProbeResult,
    Scope,
    Verdict,
    _jsonable,
)
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.registry import probes_for
from pfi_rag.probes.release import TOLERANCE_Z, Release, distribution, release_metrics
from pfi_rag.storage import atomic_write_json

logger = logging.getLogger(__name__)

# Private mode: a client is flagged when its noisy value is past the threshold by more than
# this many sigmas (one-sided 1% false alarms for a client sitting exactly at the threshold).
FLAG_Z = 2.33


@dataclass
class Summary:
    """One probe's federation-level result (from per-client results, or a federation probe)."""

    probe: str
    mode: str
    metric: str
    threshold: float
    fails_above: bool
    verdict: Verdict
    value: float | None  # the worst client's value (client probes) or the federation value
    distribution: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)
    flagged_clients: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # client (or "federation") -> reason
    errors: dict[str, str] = field(default_factory=dict)
    evidence: dict[str, Any] = field(default_factory=dict)  # federation probes only
    sigma: float | None = None  # private mode: noise sd of each released value, metric units
    tolerance: float | None = None  # private mode: stated bound on |private - plain| statistics
    seconds: float = 0.0


@dataclass
class Report:
    suite: str
    private: bool
    clients: list[str]
    summaries: list[Summary]
    per_client: list[ProbeResult]  # exact per-client results; empty in the private mode
    releases: list[Release]
    privacy: dict[str, Any]
    created_at: str
    seconds: float

    @property
    def failed(self) -> bool:
        return any(s.verdict in (Verdict.FAIL, Verdict.ERROR) for s in self.summaries)

    @property
    def exit_code(self) -> int:
        return 1 if self.failed else 0

    def as_dict(self) -> dict[str, Any]:
        return _jsonable(
            {
                "suite": self.suite,
                "mode": "private" if self.private else "plain",
                "verdict": "fail" if self.failed else "pass",
                "exit_code": self.exit_code,
                "created_at": self.created_at,
                "seconds": self.seconds,
                "clients": self.clients,
                "privacy": self.privacy,
                "probes": [{**s.__dict__, "verdict": str(s.verdict)} for s in self.summaries],
                "per_client": [r.as_dict() for r in self.per_client],
                "releases": [r.__dict__ for r in self.releases],
            }
        )


def _run_guarded(probe: Probe, call: Callable[[], ProbeResult], ctx: ProbeContext, client: str | None):
    started = time.perf_counter()
    try:
        result = call()
    except Exception as exc:  # a crashing probe is reported, never mistaken for a pass
        logger.exception("probe %s failed on %s", probe.name, client or "the federation")
        result = probe.skip(ctx, "", client=client)
        result.verdict = Verdict.ERROR
        result.evidence = {"error": f"{type(exc).__name__}: {exc}"}
    result.seconds = time.perf_counter() - started
    return result


def _client_summary(probe: ClientProbe, results: list[ProbeResult], threshold: float) -> Summary:
    ran = [r for r in results if r.verdict in (Verdict.PASS, Verdict.FAIL)]
    summary = Summary(
        probe=probe.name,
        mode=probe.mode,
        metric=probe.metric,
        threshold=threshold,
        fails_above=probe.fails_above,
        verdict=Verdict.PASS,
        value=None,
        skipped={r.client: r.evidence.get("skipped", "") for r in results if r.verdict == Verdict.SKIP},
        errors={r.client: r.evidence.get("error", "") for r in results if r.verdict == Verdict.ERROR},
        flagged_clients=[r.client for r in ran if r.verdict == Verdict.FAIL],
        seconds=sum(r.seconds for r in results),
    )
    if ran:
        summary.distribution = distribution([r.value for r in ran], fails_above=probe.fails_above)
        summary.value = summary.distribution["worst"]
        summary.extras = probe.summarize({r.client: r.metrics for r in ran})
    summary.verdict = _verdict(summary, ran)
    return summary


def _verdict(summary: Summary, ran: list) -> Verdict:
    if summary.flagged_clients:
        return Verdict.FAIL
    if summary.errors:
        return Verdict.ERROR
    return Verdict.PASS if ran else Verdict.SKIP


def _private_summary(
    probe: ClientProbe, results: list[ProbeResult], releases: dict[str, Release], threshold: float
) -> Summary:
    """The summary the server can compute from the releases alone."""
    key = f"{probe.name}.{probe.metric}"
    released = {c: r for c, r in releases.items() if key in r.values}
    summary = Summary(
        probe=probe.name,
        mode=probe.mode,
        metric=probe.metric,
        threshold=threshold,
        fails_above=probe.fails_above,
        verdict=Verdict.PASS,
        value=None,
        skipped={r.client: r.evidence.get("skipped", "") for r in results if r.verdict == Verdict.SKIP},
        errors={
            r.client: "error (details stay on the client)" for r in results if r.verdict == Verdict.ERROR
        },
    )
    if released:
        values = [r.values[key] for r in released.values()]
        sigma = max(r.sigmas[key] for r in released.values())
        summary.sigma = sigma
        summary.tolerance = TOLERANCE_Z * sigma
        summary.distribution = distribution(values, fails_above=probe.fails_above)
        summary.value = summary.distribution["worst"]
        prefix = f"{probe.name}."
        summary.extras = probe.summarize(
            {
                c: {k[len(prefix) :]: v for k, v in r.values.items() if k.startswith(prefix)}
                for c, r in released.items()
            }
        )
        margin = FLAG_Z * sigma
        summary.flagged_clients = [
            c
            for c, r in released.items()
            if (
                r.values[key] > threshold + margin
                if probe.fails_above
                else r.values[key] < threshold - margin
            )
        ]
        summary.extras["flag_margin"] = margin
    summary.verdict = _verdict(summary, list(released))
    return summary


def _federation_summary(probe: FederationProbe, result: ProbeResult) -> Summary:
    failed = result.verdict == Verdict.FAIL
    return Summary(
        probe=probe.name,
        mode=probe.mode,
        metric=probe.metric,
        threshold=result.threshold,
        fails_above=probe.fails_above,
        verdict=result.verdict,
        value=result.value,
        skipped={"federation": result.evidence["skipped"]} if result.verdict == Verdict.SKIP else {},
        errors={"federation": result.evidence["error"]} if result.verdict == Verdict.ERROR else {},
        evidence=result.evidence,
        flagged_clients=list(result.evidence.get(FLAGGED_CLIENTS, [])) if failed else [],
        seconds=result.seconds,
    )


def run_suite(
    ctx: ProbeContext,
    *,
    suite: str = "all",
    clients: list[str] | None = None,
    private: bool | None = None,
    rng: np.random.Generator | None = None,
    on_step: Callable[[str], None] | None = None,
    only: list[str] | None = None,
) -> Report:
    """Run ``suite`` over ``clients`` (default: every client with data) and return the report.

    ``only`` keeps just the named probes of the suite (a cheaper audit, e.g. the demo's).

    ``private`` defaults to ``probes.private_release``. ``rng`` draws the release noise; leave it
    None in production (fresh OS entropy: seeded noise could be subtracted by whoever knows
    the seed). ``on_step(label)`` is called before each probe step (progress bars). Torch runs
    on ``probes.threads`` threads meanwhile (every core by default).
    """
    with torch_threads(ctx.config.probes.threads or os.cpu_count() or 1):
        return _run_suite(
            ctx, suite=suite, clients=clients, private=private, rng=rng, on_step=on_step, only=only
        )


def _run_suite(
    ctx: ProbeContext,
    *,
    suite: str,
    clients: list[str] | None,
    private: bool | None,
    rng: np.random.Generator | None,
    on_step: Callable[[str], None] | None,
    only: list[str] | None,
) -> Report:
    started = time.perf_counter()
    probes = probes_for(suite)
    if only is not None:
        unknown = sorted(set(only) - {p.name for p in probes})
        if unknown:
            raise ValueError(f"no probe {', '.join(unknown)} in suite {suite!r}")
        probes = [p for p in probes if p.name in only]
    private = ctx.config.probes.private_release if private is None else private
    available = ctx.client_ids()
    clients = list(available if clients is None else clients)
    missing = [c for c in clients if c not in available]
    if missing:
        raise ValueError(f"no data for client(s) {', '.join(missing)} under {ctx.data_root}/clients")
    if not clients:
        raise ValueError(
            f"no client documents under {ctx.data_root}/clients: add some with "
            "`pfi-rag ingest --client NAME DIR/` (or `pfi-rag data synth` for a synthetic world)"
        )
    step = on_step or (lambda label: None)

    client_probes = [p for p in probes if p.scope == Scope.CLIENT]
    per_probe: dict[str, list[ProbeResult]] = {p.name: [] for p in client_probes}
    for probe in client_probes:
        for client in clients:
            step(f"{probe.name} {client}")
            per_probe[probe.name].append(
                _run_guarded(probe, lambda p=probe, c=client: p.run_client(ctx, c), ctx, client)
            )

    summaries: list[Summary] = []
    releases: dict[str, Release] = {}
    privacy: dict[str, Any] = {"mode": "plain: the operator sees every client's exact values"}
    if private:
        releases = _release_all(ctx, client_probes, per_probe, clients, rng or np.random.default_rng())
        cfg = ctx.config.probes
        privacy = {
            "mode": "private: each client released one clipped, Gaussian-noised metric vector",
            "mechanism": "Gaussian, client-level sensitivity, charged to each client's privacy ledger",
            "epsilon_per_client": cfg.release_epsilon,
            "delta_per_client": {c: r.delta for c, r in releases.items()},
            "sigma_unit": {c: r.sigma_unit for c, r in releases.items()},
            "epsilon_spent_total": {c: r.epsilon_spent_total for c, r in releases.items()},
            "tolerance_z": TOLERANCE_Z,
            "flag_z": FLAG_Z,
        }
    for probe in client_probes:
        threshold = probe.threshold(ctx)
        if private:
            summaries.append(_private_summary(probe, per_probe[probe.name], releases, threshold))
        else:
            summaries.append(_client_summary(probe, per_probe[probe.name], threshold))

    for probe in (p for p in probes if p.scope == Scope.FEDERATION):
        step(probe.name)
        if private and not probe.private_ok:
            result = probe.skip(ctx, "crosses clients' data or adapters: plain mode only")
        else:
            result = _run_guarded(probe, lambda p=probe: p.run_federation(ctx, clients), ctx, None)
        summaries.append(_federation_summary(probe, result))

    per_client = [] if private else [r for results in per_probe.values() for r in results]
    return Report(
        suite=suite,
        private=private,
        clients=clients,
        summaries=summaries,
        per_client=per_client,
        releases=list(releases.values()),
        privacy=privacy,
        created_at=dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        seconds=time.perf_counter() - started,
    )


def _release_all(
    ctx: ProbeContext,
    client_probes: list[ClientProbe],
    per_probe: dict[str, list[ProbeResult]],
    clients: list[str],
    rng: np.random.Generator,
) -> dict[str, Release]:
    """On each client: keep the exact results locally, release the noised vector."""
    cfg = ctx.config.probes
    releases = {}
    for client in clients:
        exact: dict[str, float] = {}
        bounds: dict[str, tuple[float, float]] = {}
        local = []
        for probe in client_probes:
            result = next(r for r in per_probe[probe.name] if r.client == client)
            local.append(result.as_dict())
            if result.verdict in (Verdict.PASS, Verdict.FAIL):
                for name, value in result.metrics.items():
                    exact[f"{probe.name}.{name}"] = value
                    bounds[f"{probe.name}.{name}"] = probe.bounds[name]
        atomic_write_json(client_probe_results_file(ctx.data_root, client), {"results": local})
        if not exact:
            continue
        try:  # the privacy package charges the client's ledger; the probes only read
            releases[client] = release_metrics(
                ctx.data_root, client, ctx.config.privacy, exact, bounds, epsilon=cfg.release_epsilon, rng=rng
            )
        except PrivacyError as exc:  # e.g. its budget cannot pay, or it is training right now
            logger.warning("client %s releases nothing: %s", client, exc)
    return releases
