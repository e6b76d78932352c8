"""The benchmark's outputs: a JSON of everything, a markdown table, and plots."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from pfi_rag.storage import atomic_write_json, atomic_write_text

JSON_FILE = "silent-failures.json"
MARKDOWN_FILE = "silent-failures.md"


def _f(value: float | None, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def detection_table(scores: dict[str, Any]) -> list[str]:
    lines = [
        "| planted failure | runs | meant to catch it | TPR | FPR | AUROC | caught by (any probe, TPR > 0) "
        "| federation's mean loss vs clean | silent to the federation? |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, row in scores.items():
        detectors = row["detectors"]
        cells = [row["probes"].get(p, {}) for p in detectors]
        tpr = " / ".join(_f(c.get("tpr")) for c in cells)
        fpr = " / ".join(_f(c.get("fpr")) for c in cells)
        auc = " / ".join(_f(c.get("auroc")) for c in cells)
        anyone = [p for p, c in row["probes"].items() if (c.get("tpr") or 0) > 0 and (c.get("fpr") or 0) < 1]
        system = row["system"]
        change = system.get("loss_change")
        silent = "-" if system.get("visible") is None else ("no" if system["visible"] else "yes")
        lines.append(
            f"| {name} ({row['failure']}) | {row['runs']} | {', '.join(detectors)} | {tpr} | {fpr} | {auc} "
            f"| {', '.join(anyone) or 'none'} | {'-' if change is None else f'{change:+.3f}'} | {silent} |"
        )
    return lines


def calibrated_table(scores: dict[str, Any]) -> list[str]:
    """Detection when each threshold is the worst value of the other seeds' clean runs."""
    lines = [
        "| planted failure | meant to catch it | TPR | FPR | caught by (any probe, TPR > FPR) |",
        "|---|---|---|---|---|",
    ]
    for name, row in scores.items():
        cells = [row["probes"].get(p, {}) for p in row["detectors"]]
        tpr = " / ".join(_f(c.get("calibrated_tpr")) for c in cells)
        fpr = " / ".join(_f(c.get("calibrated_fpr")) for c in cells)
        anyone = [
            p
            for p, c in row["probes"].items()
            if (c.get("calibrated_tpr") or 0) > (c.get("calibrated_fpr") or 0)
        ]
        lines.append(
            f"| {name} ({row['failure']}) | {', '.join(row['detectors'])} | {tpr} | {fpr} "
            f"| {', '.join(anyone) or 'none'} |"
        )
    return lines


def _rate_cell(row: dict[str, Any], key: str) -> str:
    """``0.80 (4/5) [0.38, 0.96]``: the rate, its counts and its Wilson 95% interval."""
    value, interval, counts = row.get(key), row.get(f"{key}_ci"), row.get(f"{key}_of")
    if value is None or interval is None or counts is None:
        return "-"
    return f"{value:.2f} ({counts[0]}/{counts[1]}) [{interval[0]:.2f}, {interval[1]:.2f}]"


def interval_table(scores: dict[str, Any]) -> list[str]:
    """One row per planted failure and intended probe: both kinds of threshold, with intervals,
    and whether the probe reaches the goal."""
    lines = [
        "| planted failure | probe | TPR | FPR | AUROC | calibrated TPR | calibrated FPR | goal |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, row in scores.items():
        for probe in row["detectors"]:
            cell = row["probes"].get(probe)
            if cell is None:
                continue
            status = row.get("goal", {}).get(probe, {}).get("status", "-")
            lines.append(
                f"| {name} | {probe} | {_rate_cell(cell, 'tpr')} | {_rate_cell(cell, 'fpr')} "
                f"| {_f(cell.get('auroc'))} | {_rate_cell(cell, 'calibrated_tpr')} "
                f"| {_rate_cell(cell, 'calibrated_fpr')} | {status} |"
            )
    return lines


def goal_table(scores: dict[str, Any]) -> list[str]:
    """Per planted failure: the intended probe that came closest to the goal, and why not."""
    from pfi_rag.benchmark.stats import STATUSES

    lines = ["| planted failure | closest probe | goal | why |", "|---|---|---|---|"]
    for name, row in scores.items():
        verdicts = row.get("goal", {})
        if not verdicts:
            continue
        probe = min(verdicts, key=lambda p: STATUSES.index(verdicts[p]["status"]))
        verdict = verdicts[probe]
        lines.append(
            f"| {name} ({row['failure']}) | {probe} ({verdict['thresholds']}) | {verdict['status']} "
            f"| {verdict['why']} |"
        )
    return lines


def false_alarm_table(runs: list[dict[str, Any]]) -> list[str]:
    clean = [r for r in runs if r["scenario"] == "clean"]
    if not clean:
        return []
    probes = sorted({p for r in clean for p in r["probes"]})
    lines = ["| probe | clean runs failed | skipped |", "|---|---|---|"]
    for p in probes:
        verdicts = [r["probes"][p]["verdict"] for r in clean if p in r["probes"]]
        lines.append(f"| {p} | {verdicts.count('fail')}/{len(verdicts)} | {verdicts.count('skip')} |")
    return lines


def _references(calibration: dict[Any, dict[str, Any]]) -> str:
    """Per seed: the healthy reports its thresholds came from, and the clean runs behind them."""
    if not calibration:
        return "no reports"
    return ", ".join(
        f"{entry['references']} reports from {entry['runs']} runs for seed {seed}"
        for seed, entry in calibration.items()
    )


def thresholds_table(calibration: dict[Any, dict[str, Any]]) -> list[str]:
    """Per probe: the configured threshold and the calibrated one each seed was judged against."""
    if not calibration:
        return []
    seeds = list(calibration)
    probes = sorted({p for entry in calibration.values() for p in entry["thresholds"]})
    columns = [
        f"seed {s} ({calibration[s]['references']} refs, {calibration[s]['runs']} runs)" for s in seeds
    ]
    lines = [
        "| probe | fails | configured | " + " | ".join(columns) + " |",
        "|---|---|---|" + "---|" * len(seeds),
    ]
    for probe in probes:
        known = [calibration[s]["thresholds"].get(probe) for s in seeds]
        first = next(k for k in known if k is not None)
        side = "above" if first["fails_above"] else "below"
        cells = ["-" if k is None else f"{k['threshold']:.4g}" for k in known]
        lines.append(f"| {probe} | {side} | {first['configured']:.4g} | " + " | ".join(cells) + " |")
    return lines


def tradeoff_table(rows: list[dict[str, Any]]) -> list[str]:
    if not rows:
        return []
    cells = list(rows[0]["mean"])
    lines = [
        "| epsilon | " + " | ".join(cells) + " |",
        "|---|" + "---|" * len(cells),
    ]
    for row in rows:
        label = "non-private" if row["epsilon"] is None else f"{row['epsilon']:g}"
        means = [row["mean"].get(c, {}) for c in cells]
        values = [f"{_f(m.get('answer_ppl'), 1)} / {_f(m.get('accuracy'))}" for m in means]
        lines.append(f"| {label} | " + " | ".join(values) + " |")
    return lines


def accumulated(meta: dict[str, Any]) -> list[str]:
    """A line for a matrix that accumulated over invocations: how many, and its runs' own time."""
    if meta.get("invocations", 1) <= 1 and not meta.get("reused"):
        return []
    codes = meta.get("code_versions", [])
    reused = "" if meta.get("report_only") else f"; runs reused by the last: {meta['reused']}"
    return [
        f"Accumulated over {meta['invocations']} invocations with the same settings (fingerprint "
        f"{meta['fingerprint']}{reused}); the runs' own time summed: "
        f"{meta['run_seconds'] / 60:.1f} min; made by {len(codes)} version(s) of pfi-rag's code "
        f"({', '.join(codes)}).  "
    ]


def _took(meta: dict[str, Any]) -> str:
    if meta.get("report_only"):
        return "tables written from the runs finished so far (nothing ran for them)"
    return f"{meta['seconds'] / 60:.1f} min"


def not_finished(meta: dict[str, Any]) -> int:
    """How many runs (matrix and trade-off) a report-only result does not cover yet."""
    missing = meta.get("missing") or {}
    return sum(map(len, missing.get("runs", {}).values())) + len(missing.get("tradeoff", []))


def partial(meta: dict[str, Any]) -> list[str]:
    """A line for a report on a matrix that is still accumulating: what it does not cover."""
    missing = meta.get("missing") or {}
    runs, tradeoff = missing.get("runs", {}), missing.get("tradeoff", [])
    count = not_finished(meta)
    if not count:
        return []
    parts = [
        f"{name} seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}"
        for name, seeds in runs.items()
    ]
    parts += [f"trade-off at epsilon {', '.join(tradeoff)}"] if tradeoff else []
    why = (
        "`--report-only`"
        if meta.get("report_only")
        else "their federations failed; the same command runs them again"
    )
    return [
        f"**Partial report** ({why}): {count} runs not finished yet, so the rates below "
        f"cover fewer runs than the full matrix. Not finished: {'; '.join(parts)}.  "
    ]


def write_outputs(out: Path, result: dict[str, Any]) -> dict[str, Path]:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / JSON_FILE, result)
    meta = result["meta"]
    lines = [
        f"# Silent-failure benchmark ({meta['preset']} preset, {meta.get('world', 'synthetic')} world)",
        "",
        f"Command: `{meta['command']}`  ",
        f"Generator {meta['generator']}, {meta['clients']} clients, {meta['rounds']} rounds, "
        f"{meta['seeds']} seeds; {_took(meta)} on {meta['machine']}.  ",
        *accumulated(meta),
        *partial(meta),
        "Versions: " + ", ".join(f"{k} {v}" for k, v in meta["versions"].items()) + ".",
        "",
    ]
    if result["runs"]:
        lines += [
            "## Detection (per planted failure; TPR/FPR/AUROC of each intended probe, in order)",
            "",
            *detection_table(result["scores"]),
            "",
            "## Detection with 95% intervals, and the goal",
            "",
            "Rates as share (count) [Wilson score 95% interval]. The goal: TPR >= 0.9 at FPR <= 0.1; "
            "*established* when the TPR interval lies above 0.9 and the FPR interval below 0.1 "
            "(35 runs a side with no miss and no false alarm), judged at the calibrated thresholds.",
            "",
            *interval_table(result["scores"]),
            "",
            *goal_table(result["scores"]),
            "",
            "## False alarms on the clean runs",
            "",
            *false_alarm_table(result["runs"]),
            "",
            "## Detection with calibrated thresholds",
            "",
            "Each threshold is the worst value the probe reached on the healthy reports (every "
            "probed round) of the clean runs of the *other* seeds (`pfi-rag calibrate-probes`; "
            "leave-one-seed-out, so the FPR is out of sample): "
            + _references(result["calibration"])
            + ". A healthy final state is worse than the final states of N other clean runs with "
            "probability at most 1/(N+1); a run's earlier rounds are correlated with its final "
            "state, not exchangeable with another run's, so they can raise a threshold but do not "
            "tighten that bound: N counts runs, not reports.",
            "",
            *calibrated_table(result["scores"]),
            "",
            "The thresholds (per seed, from the other seeds' healthy reports):",
            "",
            *thresholds_table(result["calibration"]),
            "",
        ]
    if result["tradeoff"]:
        lines += [
            "## Privacy / utility (mean over clients: answer perplexity / 4-way accuracy on planted facts)",
            "",
            *tradeoff_table(result["tradeoff"]),
            "",
        ]
    atomic_write_text(out / MARKDOWN_FILE, "\n".join(lines))
    paths = {"json": out / JSON_FILE, "markdown": out / MARKDOWN_FILE}
    paths.update(plot(out, result))
    return paths


def plot(out: Path, result: dict[str, Any]) -> dict[str, Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    paths = {}
    scores = result["scores"]
    if scores:
        scenarios = list(scores)
        probes = sorted({p for row in scores.values() for p in row["probes"]})
        first = scores[scenarios[0]]["probes"]  # FPR is the same clean runs for every scenario
        rows = ["clean: false alarm rate", *scenarios]
        grid = np.array(
            [[first.get(p, {}).get("fpr") or 0.0 for p in probes]]
            + [[scores[s]["probes"].get(p, {}).get("tpr") or 0.0 for p in probes] for s in scenarios]
        )
        fig, ax = plt.subplots(figsize=(1 + 0.55 * len(probes), 1 + 0.45 * len(rows)))
        ax.imshow(grid, vmin=0, vmax=1, cmap="Greens")
        ax.set_xticks(range(len(probes)), probes, rotation=60, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        for i, row in enumerate(rows):
            for j, p in enumerate(probes):
                mark = "*" if i > 0 and p in scores[row]["detectors"] else ""
                color = "white" if grid[i, j] > 0.5 else "black"
                ax.text(j, i, f"{grid[i, j]:.1f}{mark}", ha="center", va="center", fontsize=7, color=color)
        ax.set_title("share of runs each probe failed (* = meant to catch it)")
        fig.tight_layout()
        paths["detection_plot"] = out / "silent-failures-detection.png"
        fig.savefig(paths["detection_plot"], dpi=120)
        plt.close(fig)
    rows = result["tradeoff"]
    if rows:
        labels = ["non-private" if r["epsilon"] is None else f"eps {r['epsilon']:g}" for r in rows]
        cells = list(rows[0]["mean"])
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(len(cells), 1)
        for k, cell in enumerate(cells):
            values = [r["mean"].get(cell, {}).get("accuracy", 0.0) for r in rows]
            ax.bar(np.arange(len(rows)) + k * width, values, width, label=cell)
        ax.set_xticks(np.arange(len(rows)) + 0.4 - width / 2, labels)
        ax.set_ylabel("4-way accuracy on planted facts")
        ax.axhline(0.25, color="grey", linestyle=":", linewidth=1)
        ax.legend(fontsize=7)
        fig.tight_layout()
        paths["tradeoff_plot"] = out / "silent-failures-tradeoff.png"
        fig.savefig(paths["tradeoff_plot"], dpi=120)
        plt.close(fig)
    return paths
