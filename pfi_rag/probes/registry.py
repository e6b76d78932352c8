"""Every probe the runner knows, in report order; a new probe is one line here."""

from __future__ import annotations

from pfi_rag.probes.base import Probe
from pfi_rag.probes.bias import BiasProbe
from pfi_rag.probes.budget import BudgetProbe
from pfi_rag.probes.calibration import CalibrationProbe
from pfi_rag.probes.capability import CapabilityProbe
from pfi_rag.probes.dp_collapse import DPCollapseProbe
from pfi_rag.probes.erosion import ErosionProbe
from pfi_rag.probes.exposure import ExposureProbe
from pfi_rag.probes.fairness import FairnessProbe
from pfi_rag.probes.groundedness import GroundednessProbe
from pfi_rag.probes.leakage import LeakageProbe
from pfi_rag.probes.membership import MembershipProbe
from pfi_rag.probes.ood import OutOfDomainProbe
from pfi_rag.probes.privacy_audit import AuditProbe
from pfi_rag.probes.refusal import RefusalProbe
from pfi_rag.probes.retrieval_hit import RetrievalHitProbe
from pfi_rag.probes.silent_failures import SilentFailuresProbe
from pfi_rag.probes.stale import StaleProbe
from pfi_rag.probes.update_outliers import UpdateOutliersProbe

SUITES = ("all", "privacy", "fairness", "rag", "federation")

PROBES: tuple[Probe, ...] = (
    BiasProbe(),
    CalibrationProbe(),
    FairnessProbe(),
    CapabilityProbe(),
    RefusalProbe(),
    OutOfDomainProbe(),
    ErosionProbe(),
    ExposureProbe(),
    MembershipProbe(),
    AuditProbe(),
    LeakageProbe(),
    BudgetProbe(),
    DPCollapseProbe(),
    RetrievalHitProbe(),
    StaleProbe(),
    GroundednessProbe(),
    UpdateOutliersProbe(),
    SilentFailuresProbe(),
)


def probes_for(suite: str) -> list[Probe]:
    if suite not in SUITES:
        raise ValueError(f"unknown suite {suite!r}: choose one of {', '.join(SUITES)}")
    return [p for p in PROBES if suite == "all" or suite in p.suites]


def probe_named(name: str) -> Probe:
    for probe in PROBES:
        if probe.name == name:
            return probe
    raise KeyError(f"no probe named {name!r}")
