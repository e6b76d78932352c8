"""The probe report for machines (report.json) and people (a self-contained report.html).

The HTML embeds its plots as base64 PNGs (matplotlib, Agg backend), so one file can be
attached to a deployment review: per-client utility, calibration curves, canary exposure,
the cross-client heatmap and the per-round erosion series, from whatever the run produced.
"""

from __future__ import annotations

import base64
import html
import io
import json
from pathlib import Path
from typing import Any

from pfi_rag.probes.runner import Report
from pfi_rag.storage import atomic_write_text


def write_report(report: Report, out_dir: Path) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    data = report.as_dict()
    json_path, html_path = out_dir / "report.json", out_dir / "report.html"
    atomic_write_text(json_path, json.dumps(data, indent=2, allow_nan=False) + "\n")
    atomic_write_text(html_path, render_html(data))
    return json_path, html_path


def _png(fig) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def plots(data: dict[str, Any]) -> dict[str, str]:
    """Title -> base64 PNG, for each plot the report's data allows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per_client = {}
    for row in data["per_client"]:
        per_client.setdefault(row["probe"], []).append(row)
    summaries = {s["probe"]: s for s in data["probes"]}
    out: dict[str, str] = {}

    rows = [r for r in per_client.get("fairness", []) if r["verdict"] in ("pass", "fail")]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 3.2))
        kinds = ["personalized", "global", "local", "base"]
        width = 0.8 / len(kinds)
        for k, kind in enumerate(kinds):
            values = [r["evidence"]["utility"].get(kind) or 0.0 for r in rows]
            ax.bar([i + k * width for i in range(len(rows))], values, width, label=kind)
        ax.set_xticks(
            [i + 0.4 - width / 2 for i in range(len(rows))], [r["client"] for r in rows], rotation=30
        )
        ax.set_ylabel("utility = exp(-answer NLL)")
        ax.legend(fontsize=7)
        out["Per-client utility"] = _png(fig)

    rows = [r for r in per_client.get("calibration", []) if r["verdict"] in ("pass", "fail")]
    if rows:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        ax.plot([0, 1], [0, 1], "k:", lw=1)
        for r in rows:
            curve = r["evidence"]["curve"]
            ax.plot(
                [c[0] for c in curve],
                [c[1] for c in curve],
                "o-",
                ms=3,
                label=f"{r['client']} ECE {r['value']:.2f}",
            )
        ax.set_xlabel("confidence")
        ax.set_ylabel("accuracy")
        ax.legend(fontsize=6)
        out["Calibration curves"] = _png(fig)

    exposures = [
        (c["exposure"], r["client"])
        for r in per_client.get("exposure", [])
        if r["verdict"] in ("pass", "fail")
        for c in r["evidence"]["canaries"]
    ]
    if exposures:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.hist([e for e, _ in exposures], bins=20, range=(0, 20))
        ax.axvline(summaries["exposure"]["threshold"], color="r", ls="--", label="threshold")
        ax.set_xlabel("canary exposure (bits)")
        ax.set_ylabel("canaries")
        ax.legend(fontsize=7)
        out["Canary exposure distribution"] = _png(fig)

    ood = summaries.get("ood", {}).get("evidence", {})
    if "matrix" in ood:
        fig, ax = plt.subplots(figsize=(4.5, 4))
        image = ax.imshow(ood["matrix"], cmap="RdYlGn_r")
        ax.set_xticks(range(len(ood["data"])), ood["data"], rotation=45, fontsize=7)
        ax.set_yticks(range(len(ood["adapters"])), ood["adapters"], fontsize=7)
        ax.set_xlabel("data of client")
        ax.set_ylabel("adapter of client")
        fig.colorbar(image, label="answer NLL change vs base (nats/token)")
        out["Cross-client matrix"] = _png(fig)

    erosion = summaries.get("erosion", {}).get("evidence", {})
    if "refusal" in erosion:
        fig, ax = plt.subplots(figsize=(5, 3))
        ax.plot(erosion["rounds"], erosion["refusal"], "o-", label="P(refuse), global adapter")
        ax.axhline(erosion["reference"], color="k", ls=":", label="base model")
        ax.plot(erosion["rounds"], erosion["cusum"], "s--", label="CUSUM")
        ax.axhline(summaries["erosion"]["threshold"], color="r", ls="--", label="alarm level")
        ax.set_xlabel("round")
        ax.legend(fontsize=7)
        out["Per-round alignment erosion"] = _png(fig)

    if data["releases"]:
        released = [s for s in data["probes"] if s.get("sigma") is not None]
        fig, axes = plt.subplots(1, len(released), figsize=(1.8 * len(released) + 1, 3), squeeze=False)
        for ax, s in zip(axes[0], released, strict=True):
            key = f"{s['probe']}.{s['metric']}"
            values = [r["values"][key] for r in data["releases"] if key in r["values"]]
            ax.plot([0] * len(values), values, "o", alpha=0.6)
            ax.axhline(s["threshold"], color="r", ls="--")
            ax.set_title(s["probe"], fontsize=7)
            ax.set_xticks([])
        out["Private releases (noisy per-client values)"] = _png(fig)
    return out


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return "" if value is None else str(value)


def render_html(data: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for s in data["probes"]:
        rows.append(
            f"<tr class='{e(s['verdict'])}'><td>{e(s['probe'])}</td><td>{e(s['mode'])}</td>"
            f"<td>{e(s['metric'])}</td><td>{e(_fmt(s['value']))}</td>"
            f"<td>{'&gt;' if s['fails_above'] else '&lt;'} {e(_fmt(s['threshold']))}</td>"
            f"<td>{e(s['verdict'])}</td><td>{e(', '.join(s['flagged_clients']))}</td>"
            f"<td>{e(_fmt(s.get('sigma')))}</td></tr>"
        )
    images = "".join(
        f"<figure><img alt='{e(title)}' src='data:image/png;base64,{png}'>"
        f"<figcaption>{e(title)}</figcaption></figure>"
        for title, png in plots(data).items()
    )
    details = "".join(
        f"<details><summary>{e(s['probe'])}</summary>"
        f"<pre>{e(json.dumps(s, indent=1)[:20000])}</pre></details>"
        for s in data["probes"]
    )
    per_client = "".join(
        f"<details><summary>{e(r['probe'])} / {e(r['client'] or '')}: {e(r['verdict'])}</summary>"
        f"<pre>{e(json.dumps(r['evidence'], indent=1)[:8000])}</pre></details>"
        for r in data["per_client"]
    )
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>pfi-rag probe report</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; color: #222; }}
table {{ border-collapse: collapse; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; font-size: 13px; }}
tr.fail td, tr.error td {{ background: #fde2e2; }} tr.pass td {{ background: #e6f6e6; }}
tr.skip td {{ color: #888; }} figure {{ display: inline-block; margin: 1em; }}
pre {{ font-size: 11px; background: #f6f6f6; padding: 6px; overflow-x: auto; }}
</style></head><body>
<h1>pfi-rag probe report: {e(data["verdict"].upper())}</h1>
<p>suite <b>{e(data["suite"])}</b>, mode <b>{e(data["mode"])}</b>, {len(data["clients"])} clients,
created {e(data["created_at"])}, {data["seconds"]:.1f} s. Exit code {data["exit_code"]}.</p>
<p>{e(json.dumps(data["privacy"]))}</p>
<table><tr><th>probe</th><th>failure mode</th><th>metric</th><th>worst / value</th><th>fails when</th>
<th>verdict</th><th>flagged clients</th><th>noise sigma</th></tr>
{"".join(rows)}</table>
<h2>Plots</h2>{images or "<p>No plot: no probe produced plottable data.</p>"}
<h2>Federation-level evidence</h2>{details}
<h2>Per-client evidence</h2>{per_client or "<p>Private mode: per-client results stayed on the clients.</p>"}
</body></html>
"""
