"""The probe suite and the one-run privacy audit on real text, on the default model (SmolLM2-135M).

Clients are chatterbot-corpus topics written as ``.txt`` files (tests/realtext.py), ingested with
``pfi-rag ingest``; nothing is planted and nothing comes from a hub. One command measures:

1. **audit**: per budget epsilon E, a fresh data root with one client, audit canaries on,
   ``pfi-rag train --epsilon E``, then the ``audit`` and ``budget`` probes (report.json): the
   audited epsilon lower bound against the ledger's epsilon. A non-private control (the same
   corpus and canaries of the first budget's client, trained in process with ``private=False``
   and the same steps) shows whether the audit has power on this model.
2. **suite**: several clients ingested, ``pfi-rag federate --rounds 1`` with canaries on, then
   ``pfi-rag probe --suite all --out``: its wall time and each probe's seconds from report.json,
   with the machine's load (``uptime``) before and after.

    python bench/realtext_probes.py --budgets 4,8 --audit-topic coding --steps 20 \
        --topics emotion,psychology,ai --local-steps 5 --out bench/results/realtext-probes-smollm2.txt
"""

from __future__ import annotations

import argparse
import copy
import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # tests.realtext writes the corpus topics as .txt files

from tests.realtext import write_topic  # noqa: E402

CLI = [str(Path(sys.executable).parent / "pfi-rag")]
LINES: list[str] = []


def say(line: str = "") -> None:
    print(line, flush=True)
    LINES.append(line)


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def cli(root: Path, sets: dict, *args: str, check: bool = True) -> tuple[subprocess.CompletedProcess, float]:
    options = ["--data-root", str(root)] + [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
    started = time.perf_counter()
    done = subprocess.run([*CLI, *options, *args], capture_output=True, text=True)
    seconds = time.perf_counter() - started
    if check and done.returncode != 0:
        raise SystemExit(f"{' '.join(args[:3])} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
    return done, seconds


def ingest(root: Path, sets: dict, topic: str, work: Path, per_file: int) -> None:
    directory = write_topic(topic, work / "txt" / topic, per_file=per_file)
    cli(root, sets, "ingest", "--client", topic, f"{directory}/")


# -- 1. the audit at each budget, and a non-private control ----------------------------------


def audit_part(args, work: Path) -> None:
    from pfi_rag.config import load_config
    from pfi_rag.data.audit_canaries import audit_training_documents, load_canaries
    from pfi_rag.data.corpus import load_corpus
    from pfi_rag.models.loading import load_generator
    from pfi_rag.models.lora import attach_lora
    from pfi_rag.privacy import train_adapter
    from pfi_rag.probes import ProbeContext
    from pfi_rag.probes.privacy_audit import audit_canaries, canary_scores
    from pfi_rag.probes.report import write_report
    from pfi_rag.probes.runner import run_suite

    topic = args.audit_topic
    say(f"## 1. One-run audit: client {topic!r}, {args.canaries} canaries, {args.steps} steps per run")
    say(f"uptime before: {uptime()}")
    rows, first = [], None
    model = tokenizer = None
    for epsilon in args.budgets:
        root = work / f"audit-eps{epsilon:g}"
        sets = {
            **args.common,
            "privacy.audit_canaries": args.canaries,
            "privacy.epsilon_max": max(epsilon, 8.0),
            "privacy.epsilon_per_round": epsilon,
        }
        cfg = load_config(overrides={"data_root": str(root), **sets})
        if model is None:
            model, tokenizer, _ = load_generator(cfg.models)
        first = first or (root, cfg)
        if (root / "report" / "report.json").is_file():  # --workdir of an earlier run: reuse it
            data = json.loads((root / "report" / "report.json").read_text())
            audit = next(r for r in data["per_client"] if r["probe"] == "audit")
            rows.append((f"DP eps {epsilon:g}", audit["evidence"], audit["verdict"], 0.0, 0.0))
            say(f"  eps {epsilon:g}: reused {root}")
            continue
        ingest(root, sets, topic, work / f"eps{epsilon:g}", args.per_file)
        trained, train_s = cli(
            root,
            sets,
            "train",
            "--client",
            topic,
            "--epsilon",
            f"{epsilon}",
            "--steps",
            str(args.steps),
            "--seed",
            "1",
            "--json",
        )
        result = json.loads(trained.stdout[trained.stdout.index("{") :])
        ctx = ProbeContext(cfg, generator=(model, tokenizer))
        started = time.perf_counter()
        try:
            report = run_suite(ctx, suite="privacy", clients=[topic], only=["audit", "budget"])
        finally:
            ctx.close()
        probe_s = time.perf_counter() - started
        write_report(report, root / "report")
        data = json.loads((root / "report" / "report.json").read_text())
        audit = next(r for r in data["per_client"] if r["probe"] == "audit")
        ev = audit["evidence"]
        rows.append((f"DP eps {epsilon:g}", ev, audit["verdict"], train_s, probe_s))
        say(
            f"  eps {epsilon:g}: trained {result.get('documents')} documents (+ inserted canaries), "
            f"noise multiplier {result.get('noise_multiplier')}, train {train_s:.0f} s, audit {probe_s:.0f} s"
        )

    if args.control_steps:
        root, cfg = first
        corpus = load_corpus(root, topic, held_out_share=cfg.data.held_out_share)
        documents = [*corpus.train, *audit_training_documents(root, topic, cfg.privacy)]
        canaries = load_canaries(root, topic)
        started = time.perf_counter()
        public = attach_lora(copy.deepcopy(model), cfg.adapter, seed=cfg.seed)
        train_adapter(
            public,
            tokenizer,
            documents=documents,
            instructions=corpus.instructions,
            cfg=cfg.privacy,
            ledger=None,
            steps=args.control_steps,
            seed=1,
            private=False,
        )
        public.eval()
        train_s = time.perf_counter() - started
        started = time.perf_counter()
        scores = canary_scores(model, public, tokenizer, canaries)
        delta = rows[0][1]["delta"]
        res = audit_canaries(scores, canaries, guess_share=cfg.probes.audit_guess_share, delta=delta)
        inserted = np.array([c.inserted for c in canaries])
        ev = {
            **res.as_dict(),
            "ledger_epsilon": float("inf"),
            "mean_score_inserted": float(scores[inserted].mean()),
            "mean_score_controls": float(scores[~inserted].mean()),
        }
        rows.append(
            (f"non-private, {args.control_steps} steps", ev, "-", train_s, time.perf_counter() - started)
        )

    say()
    say("| run | ledger eps | audited eps lower bound | right / guesses | mean score in / out | verdict |")
    say("|---|---|---|---|---|---|")
    for name, ev, verdict, _, _ in rows:
        say(
            f"| {name} | {ev['ledger_epsilon']:.3f} | {ev['epsilon_lower_bound']:.3f} | "
            f"{ev['correct']} / {ev['guesses']} | {ev['mean_score_inserted']:+.4f} / "
            f"{ev['mean_score_controls']:+.4f} | {verdict} |"
        )
    say(f"(delta {rows[0][1]['delta']}; scores: per-token NLL base - adapter, nats)")
    say(f"uptime after: {uptime()}")
    say()


# -- 2. the whole suite on a federated set of real-text clients ------------------------------


def suite_part(args, work: Path) -> None:
    root = work / "suite"
    sets = {
        **args.common,
        "privacy.audit_canaries": args.canaries,
        "privacy.local_steps": args.local_steps,
        "privacy.epsilon_per_round": args.suite_epsilon,
        "privacy.epsilon_max": max(args.suite_epsilon, 8.0),
        **dict(kv.split("=", 1) for kv in args.probe_set),
    }
    say(
        f"## 2. probe --suite all: clients {', '.join(args.topics)}, federate --rounds 1 "
        f"({args.local_steps} local steps, eps {args.suite_epsilon:g}), settings {json.dumps(sets)}"
    )
    for topic in args.topics:
        ingest(root, sets, topic, work / "suite-txt", args.per_file)
    _, fed_s = cli(root, sets, "federate", "--rounds", "1")
    say(f"federate --rounds 1: {fed_s:.0f} s")
    before = uptime()
    probed, wall = cli(root, sets, "probe", "--suite", "all", "--out", str(root / "report"), check=False)
    after = uptime()
    report = json.loads((root / "report" / "report.json").read_text())
    summaries = sorted(report["probes"], key=lambda s: -s["seconds"])
    say(
        f"probe --suite all: wall {wall:.0f} s (report.json seconds {report['seconds']:.0f}), "
        f"exit {probed.returncode}"
    )
    say(f"uptime before: {before}")
    say(f"uptime after:  {after}")
    say()
    say("| probe | seconds | verdict | value | skipped / errors |")
    say("|---|---|---|---|---|")
    for s in summaries:
        value = "-" if s["value"] is None else f"{s['value']:.4g}"
        say(
            f"| {s['probe']} | {s['seconds']:.1f} | {s['verdict']} | {value} | "
            f"{len(s['skipped'])} / {len(s['errors'])} |"
        )
    audits = [r for r in report["per_client"] if r["probe"] == "audit"]
    for r in audits:
        ev = r["evidence"]
        if "epsilon_lower_bound" in ev:
            bound, ledger = ev["epsilon_lower_bound"], ev["ledger_epsilon"]
            say(f"audit {r['client']}: lower bound {bound:.3f} vs ledger {ledger:.3f}")
    say()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["both", "audit", "suite"], default="both")
    parser.add_argument("--budgets", default="4,8", help="comma-separated epsilons for the audit runs")
    parser.add_argument("--audit-topic", default="coding")
    parser.add_argument("--steps", type=int, default=20, help="DP-SGD steps of each audit run")
    parser.add_argument("--control-steps", type=int, default=20, help="non-private control steps (0: none)")
    parser.add_argument("--canaries", type=int, default=64)
    parser.add_argument("--topics", default="emotion,psychology,ai", help="clients of the suite run")
    parser.add_argument(
        "--local-steps", type=int, default=5, help="local DP-SGD steps in the federated round"
    )
    parser.add_argument("--suite-epsilon", type=float, default=8.0, help="epsilon of the federated round")
    parser.add_argument("--per-file", type=int, default=2, help="conversations per .txt file")
    parser.add_argument("--probe-set", action="append", default=[], help="extra --set for the suite run")
    parser.add_argument("--workdir", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=None, help="write the printed table here too")
    args = parser.parse_args(argv)
    args.budgets = [float(b) for b in args.budgets.split(",")]
    args.topics = args.topics.split(",")
    args.common = {"models.device": "cpu"}  # the default generator (smollm2) and everything else default

    say("$ " + shlex.join(["python", "bench/realtext_probes.py", *(argv or sys.argv[1:])]))
    say(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, default model (SmolLM2-135M), cpu")
    started = time.perf_counter()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="realtext-probes-"))
    if args.part in ("both", "suite"):
        suite_part(args, work)
    if args.part in ("both", "audit"):
        audit_part(args, work)
    say(f"total {time.perf_counter() - started:.0f} s; work dir {work}")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text("\n".join(LINES) + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
