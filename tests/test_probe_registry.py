"""Adding a probe is one class: defined here, registered, and run by the suite like a shipped one."""

from __future__ import annotations

import pytest

from pfi_rag.config import Config, ConfigError
from pfi_rag.probes import ClientProbe, Need, ProbeContext, Verdict, probe_named, probes_for, run_suite
from pfi_rag.probes.registry import register, unregister
from tests.probe_support import make_data

SHIPPED = [
    "bias",
    "calibration",
    "fairness",
    "capability",
    "refusal",
    "ood",
    "erosion",
    "exposure",
    "membership",
    "audit",
    "leakage",
    "budget",
    "dp_collapse",
    "retrieval_hit",
    "stale",
    "groundedness",
    "update_outliers",
    "silent_failures",
]


class DocumentCountProbe(ClientProbe):
    """A client with more documents than the threshold fails (trivial, no model)."""

    name = "document_count"
    mode = "too many documents"
    suites = ("rag",)
    needs = (Need.CLIENT_DATA,)
    metric = "documents"
    bounds = {"documents": (0.0, 1e6)}
    default_threshold = 1000.0  # no probes.document_count_threshold config key: this is its default

    def run_client(self, ctx: ProbeContext, client_id: str):
        corpus = ctx.corpus(client_id)
        return self.result(ctx, len(corpus.train) + len(corpus.held_out), client=client_id)


@pytest.fixture
def registered():
    register(DocumentCountProbe)
    yield
    unregister(DocumentCountProbe.name)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    path = tmp_path_factory.mktemp("registry")
    make_data(path, clients=2)
    return path


def test_shipped_probes_keep_their_report_order():
    assert [p.name for p in probes_for("all")] == SHIPPED
    with pytest.raises(KeyError):
        probe_named("document_count")


def test_a_probe_defined_outside_the_package_runs_in_the_suite(root, registered, tmp_path):
    assert isinstance(probe_named("document_count"), DocumentCountProbe)
    assert [p.name for p in probes_for("all")] == [*SHIPPED, "document_count"]
    assert "document_count" in [p.name for p in probes_for("rag")]
    assert "document_count" not in [p.name for p in probes_for("privacy")]

    report = run_suite(ProbeContext(Config(data_root=root)), only=["document_count"], private=False)
    (summary,) = report.summaries
    counts = {r.client: r.value for r in report.per_client}
    assert summary.probe == "document_count" and summary.threshold == 1000.0
    assert summary.verdict == Verdict.PASS and len(counts) == 2 and min(counts.values()) > 1

    # A thresholds file sets it by name, like a shipped probe's; a name no probe has is refused.
    path = tmp_path / "thresholds.toml"
    path.write_text("[probes]\ndocument_count_threshold = 1\n")
    cfg = Config(data_root=root, probes={"thresholds_file": path})
    report = run_suite(ProbeContext(cfg), only=["document_count"], private=False)
    assert (report.summaries[0].threshold, report.summaries[0].verdict) == (1.0, Verdict.FAIL)
    path.write_text("[probes]\nno_such_probe_threshold = 1\n")
    with pytest.raises(ConfigError, match="no_such_probe_threshold"):
        ProbeContext(cfg)
    path.write_text('[probes]\ndocument_count_threshold = "high"\n')
    with pytest.raises(ConfigError, match="document_count_threshold"):
        ProbeContext(cfg)


def test_a_probe_without_a_threshold_or_with_a_taken_name_is_refused():
    class NoThreshold(DocumentCountProbe):
        name = "no_threshold"
        default_threshold = None

    class Twin(DocumentCountProbe):
        name = "bias"

    with pytest.raises(TypeError, match="default_threshold"):
        register(NoThreshold)
    with pytest.raises(ValueError, match="two probes named 'bias'"):
        register(Twin)
