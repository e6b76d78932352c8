"""Silent-failure probes of federated personalization, their runner and reports (docs/probes.md)."""

from pfi_rag.probes.base import ClientProbe, FederationProbe, Need, Probe, ProbeResult, Scope, Verdict
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.registry import SUITES, probe_named, probes_for, register
from pfi_rag.probes.runner import Report, Summary, run_suite

__all__ = [
    "PROBES",
    "SUITES",
    "ClientProbe",
    "FederationProbe",
    "Need",
    "Probe",
    "ProbeContext",
    "ProbeResult",
    "Report",
    "Scope",
    "Summary",
    "Verdict",
    "probe_named",
    "probes_for",
    "register",
    "run_suite",
]


def __getattr__(name: str):
    if name == "PROBES":  # every registered probe in report order, found on first use
        from pfi_rag.probes import registry

        return registry.PROBES
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
