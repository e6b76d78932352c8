"""The whole probe suite on clients made only of real text (chatterbot-corpus topics as .txt files).

Nothing here is planted: no manifest, no synthetic questions, no shared files under the data root.
The clients are ingested, edited once (a user changes a file and ingests it again), trained,
federated for one round on the tiny model with audit canaries on, and probed with
``pfi-rag probe --suite all``. Every probe must run on them (none skipped, none errored), and the
report's numbers must be the ones the probes compute when run directly.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.config import load_config
from pfi_rag.probes import PROBES, ProbeContext, probe_named
from pfi_rag.probes.base import Scope
from tests.federation_support import cli_options, tiny_federation_settings
from tests.realtext import write_topics

TOPICS = ("emotion", "psychology")  # two short topics: every cross-client probe needs two
# Recomputed directly and compared with the report, one per kind of input they read.
RECOMPUTED = ("calibration", "membership", "audit", "stale", "retrieval_hit", "capability", "exposure")
AGAIN = "psychology"  # the client they are run again on


def _edit_a_file(directory: Path) -> str:
    """Replace the first long line of the first file (a user correcting a note); the old line."""
    path = sorted(directory.glob("*.txt"))[0]
    lines = path.read_text(encoding="utf-8").splitlines()
    index = next(i for i, line in enumerate(lines) if len(line.split()) >= 6)
    old, lines[index] = lines[index], "That answer was wrong, so it is replaced by this corrected note."
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return old


@pytest.mark.slow
def test_probe_suite_runs_every_probe_on_real_text_clients_and_reports_what_they_computed(
    tmp_path, model_cache, embedder, tiny_generator
):
    # Prepare: three clients from .txt files, one file edited and ingested again.
    root = tmp_path / "data"
    directories = write_topics(tmp_path / "txt", TOPICS, per_file=2)
    sets = tiny_federation_settings(
        model_cache,
        **{
            "data.held_out_share": 0.3,
            "privacy.max_seq_len": 64,
            "privacy.audit_canaries": 16,
            "federation.rounds": 1,
            "retrieval.chunk_tokens": 64,  # short passages: short prompts with retrieved context
            "retrieval.chunk_overlap": 8,
            "retrieval.top_k": 2,
            "probes.exposure_samples": 16,
            "probes.cloze_items": 16,
            "probes.answer_tokens": 4,
        },
    )
    options = cli_options(root, sets)
    runner = CliRunner()
    for client, directory in directories.items():
        result = runner.invoke(app, [*options, "ingest", "--client", client, f"{directory}/"])
        assert result.exit_code == 0, result.output
    old_line = _edit_a_file(directories["psychology"])
    edited = directories["psychology"]
    result = runner.invoke(app, [*options, "ingest", "--client", "psychology", f"{edited}/"])
    assert result.exit_code == 0, result.output
    trained = runner.invoke(app, [*options, "train", "--client", "emotion", "--steps", "2"])
    assert trained.exit_code == 0, trained.output
    federated = runner.invoke(app, [*options, "federate", "--rounds", "1"])
    assert federated.exit_code == 0, federated.output
    assert not (root / "shared").exists() and not (root / "manifest.json").exists()

    # Execute
    out = tmp_path / "report"
    probed = runner.invoke(app, [*options, "probe", "--suite", "all", "--out", str(out)])
    report = json.loads((out / "report.json").read_text())

    # Assert: every probe ran on every client, and the exit code is the verdict's.
    assert probed.exit_code == report["exit_code"], probed.output
    summaries = {s["probe"]: s for s in report["probes"]}
    assert set(summaries) == {p.name for p in PROBES}
    not_run = {n: (s["skipped"], s["errors"]) for n, s in summaries.items() if s["skipped"] or s["errors"]}
    assert not_run == {}
    assert all(s["verdict"] in ("pass", "fail") for s in summaries.values())
    per_client = {(r["probe"], r["client"]): r for r in report["per_client"]}
    client_probes = [p.name for p in PROBES if p.scope == Scope.CLIENT]
    assert set(per_client) == {(p, c) for p in client_probes for c in TOPICS}
    assert all(r["verdict"] in ("pass", "fail") for r in per_client.values())

    # The federation summary of a client probe is the worst of the clients' values.
    for name in client_probes:
        values = [per_client[(name, c)]["value"] for c in TOPICS]
        worst = max(values) if summaries[name]["fails_above"] else min(values)
        assert summaries[name]["value"] == pytest.approx(worst), name

    # The report's numbers are the probes' own: run directly, they give the same values.
    cfg = load_config(overrides={"data_root": str(root), **sets})
    model, tokenizer, _ = tiny_generator
    ctx = ProbeContext(cfg, generator=(model, tokenizer), embedder=embedder)
    try:
        for name in RECOMPUTED:
            direct = probe_named(name).run_client(ctx, AGAIN)
            reported = per_client[(name, AGAIN)]
            assert direct.value == pytest.approx(reported["value"], rel=1e-5, abs=1e-6), name
            assert direct.metrics == pytest.approx(reported["metrics"], rel=1e-5, abs=1e-6), name
    finally:
        ctx.close()

    # What the numbers measured: cloze items from held-out documents, the store's own history,
    # the audit canaries under the ledger's epsilon.
    assert per_client[("calibration", "emotion")]["evidence"]["item_kind"] == "cloze"
    stale = per_client[("stale", "psychology")]["evidence"]
    assert stale["source"] == "store history" and stale["statements"] >= 1
    assert old_line.split()[0] in json.dumps(stale) or per_client[("stale", "psychology")]["value"] == 0.0
    audit = per_client[("audit", "emotion")]["evidence"]
    assert audit["canaries"] == 16 and audit["epsilon_lower_bound"] <= audit["ledger_epsilon"]
    assert per_client[("exposure", "emotion")]["evidence"]["source"] == "audit canaries"
    assert per_client[("membership", "psychology")]["evidence"]["nonmember_source"] == "held-out documents"
    assert math.isfinite(summaries["erosion"]["value"]) and summaries["silent_failures"]["value"] is not None
