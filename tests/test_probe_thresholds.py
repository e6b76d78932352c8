"""Calibrated probe thresholds: from reference reports, through the config, to the CLI."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from pfi_rag.cli import app
from pfi_rag.config import Config, ConfigError, with_probe_thresholds
from pfi_rag.probes.context import ProbeContext
from pfi_rag.probes.registry import probe_named
from pfi_rag.probes.thresholds import calibrate, thresholds_toml


def summary(probe, value, *, metric=None, threshold=0.05, fails_above=True, verdict="pass"):
    return {
        "probe": probe,
        "metric": metric or probe_named(probe).metric,
        "value": value,
        "threshold": threshold,
        "fails_above": fails_above,
        "verdict": verdict,
    }


def report(*summaries):
    return {"probes": list(summaries)}


REPORTS = [
    report(
        summary("bias", 0.004),
        summary("dp_collapse", -0.01, threshold=0.0, fails_above=False),
        summary("refusal", -0.002, threshold=0.1),
        summary("stale", 0.0, verdict="skip"),
    ),
    report(
        summary("bias", 0.011, verdict="pass"),
        summary("dp_collapse", -0.03, threshold=0.0, fails_above=False, verdict="fail"),
        summary("refusal", -0.001, threshold=0.1),
        summary("stale", 0.0),
    ),
]


def test_each_threshold_is_the_worst_reference_value_inside_the_fields_limits():
    calibrated = {c.probe: c for c in calibrate(REPORTS)}

    assert calibrated["bias"].threshold == 0.011  # fails above: the largest
    assert calibrated["dp_collapse"].threshold == -0.03  # fails below: the smallest
    assert calibrated["refusal"].threshold == 0.0  # -0.001 raised to the field's ge=0
    assert "stale" not in calibrated  # skipped in one reference: its healthy range is unknown
    assert calibrated["bias"].configured == 0.05 and calibrated["bias"].false_alarm_bound == 1 / 3
    with pytest.raises(ValueError, match="at least one"):
        calibrate([])


def test_references_on_another_metric_than_the_probe_reads_now_are_left_out():
    # calibration once failed on the absolute ECE; it now reads the increase over the base model,
    # so a threshold from old reports (ECE 0.4-0.6) would never fire on the new metric.
    old = [report(summary("calibration", 0.44, metric="ece"), summary("bias", 0.01)) for _ in range(2)]
    mixed = [old[0], report(summary("calibration", 0.002), summary("bias", 0.02))]

    assert [c.probe for c in calibrate(old)] == ["bias"]
    assert [c.probe for c in calibrate(mixed)] == ["bias"]
    assert calibrate([report(summary("calibration", 0.002))] * 2)[0].threshold == 0.002


def test_a_thresholds_file_replaces_the_configured_thresholds_and_nothing_else(tmp_path):
    path = tmp_path / "thresholds.toml"
    path.write_text(thresholds_toml(calibrate(REPORTS), ["a.json", "b.json"]))
    cfg = Config(data_root=tmp_path, probes={"thresholds_file": path})

    applied = ProbeContext(cfg).config.probes

    assert (applied.bias_threshold, applied.dp_collapse_threshold) == (0.011, -0.03)
    assert applied.ood_threshold == Config().probes.ood_threshold  # not in the file: unchanged
    path.write_text("[probes]\nprivate_release = false\n")
    with pytest.raises(ConfigError, match="only \\[probes\\] <probe>_threshold keys.*private_release"):
        with_probe_thresholds(cfg)
    path.write_text("probes = 3\n")
    with pytest.raises(ConfigError, match="not probes \\(not a table\\)"):
        with_probe_thresholds(cfg)
    path.write_text("[probes]\nmembership_threshold = 0.2\n")
    with pytest.raises(ConfigError, match="membership_threshold"):
        with_probe_thresholds(cfg)


def test_calibrate_probes_cli_writes_the_file_and_refuses_what_is_not_a_report(tmp_path):
    paths = []
    for number, data in enumerate(REPORTS):
        paths.append(tmp_path / f"report-{number}.json")
        paths[-1].write_text(json.dumps(data))
    out = tmp_path / "thresholds.toml"
    runner = CliRunner()

    result = runner.invoke(app, ["calibrate-probes", *map(str, paths), "--out", str(out)])

    assert result.exit_code == 0, result.output
    assert "bias_threshold = 0.011" in out.read_text() and "33%" in result.output
    not_a_report = tmp_path / "other.json"
    not_a_report.write_text('{"scores": {}}')
    refused = runner.invoke(app, ["calibrate-probes", str(not_a_report), "--out", str(tmp_path / "x.toml")])
    assert refused.exit_code == 2 and "not a probe report" in refused.output
    assert not (tmp_path / "x.toml").exists()
    broken = runner.invoke(
        app, ["--data-root", str(tmp_path), "--set", f"probes.thresholds_file={paths[0]}", "probe"]
    )
    assert broken.exit_code == 2 and "probes.thresholds_file: cannot read" in broken.output
