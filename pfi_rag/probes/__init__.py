"""Silent-failure probes of federated personalization, their runner and reports (docs/probes.md)."""

from pfi_rag.probes.base import ClientProbe, FederationProbe, Need, Probe, ProbeResult, Scope, Verdict
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.registry import PROBES, SUITES, probe_named, probes_for
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
    "run_suite",
]
