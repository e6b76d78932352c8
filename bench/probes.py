"""Time ``probe --suite all`` on four clients on the default model (SmolLM2-135M), probe by probe.

Builds a small federated world once (kept in ``--workdir`` and reused by later runs), then loads
the generator once and runs ``run_suite`` ``--repeats`` times, each with a fresh ProbeContext
(adapters, items and caches rebuilt, as in one ``pfi-rag probe`` call). Prints each probe's
wall and CPU seconds (median over repeats) and the suite's total, with the machine's load
(``uptime``), and the suite's median wall time against the target of 3 minutes for four
clients. The probes run torch on every core (``probes.threads``), so CPU seconds exceed wall
seconds on an idle machine; on a busy one they are what the load does not inflate.

Worlds:

- ``realtext``: four chatterbot-corpus topics written as ``.txt`` files and ingested (no manifest:
  cloze items, audit canaries, the shipped evaluation sets);
- ``synth``: ``pfi-rag data synth --clients 4`` (planted questions, canaries, twins).

Both are federated for one round with few local DP steps: the probes' cost does not depend on
how well the adapters trained.

    python bench/probes.py --world realtext --repeats 1 --workdir /tmp/probes-bench \
        --out bench/results/probes-suite.txt
"""

from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

# The helpers of the real-text probe bench beside this file: printing, the CLI, ingesting a topic.
from realtext_probes import LINES, cli, ingest, say, uptime

TOPICS = "ai,coding,emotion,psychology"
TARGET_SECONDS = 180.0  # `probe --suite all` on four clients on the default model, two cores


def build(world: str, root: Path, sets: dict, topics: list[str]) -> None:
    """Clients and one federated round under ``root``, unless an earlier run left them there."""
    if (root / "federation").is_dir():
        say(f"world {world}: reused {root}")
        return
    started = time.perf_counter()
    if world == "synth":
        cli(root, sets, "data", "synth", "--clients", str(len(topics)))
    else:
        for topic in topics:
            ingest(root, sets, topic, root.parent / f"{world}-files", per_file=2)  # outside the data root
    seconds = time.perf_counter() - started
    _, fed = cli(root, sets, "federate", "--rounds", "1")
    say(f"world {world}: data {seconds:.0f} s, federate --rounds 1 {fed:.0f} s")


def time_suite(root: Path, sets: dict, repeats: int, only: list[str] | None):
    """Per probe (and TOTAL): wall seconds and CPU seconds of each repeat."""
    from pfi_rag.config import load_config
    from pfi_rag.models.loading import load_generator
    from pfi_rag.probes import ProbeContext
    from pfi_rag.probes.registry import probes_for
    from pfi_rag.probes.runner import run_suite

    cfg = load_config(overrides={"data_root": str(root), **sets})
    started = time.perf_counter()
    generator = load_generator(cfg.models)[:2]
    say(f"generator loaded in {time.perf_counter() - started:.1f} s ({cfg.models.generator})")
    names = only or [p.name for p in probes_for("all")]
    seconds: dict[str, list[float]] = {}
    cpu_seconds: dict[str, list[float]] = {}  # this process's CPU time: what load does not inflate
    for repeat in range(repeats):
        # One context for the whole suite, as in one `pfi-rag probe` call; the probes run one at a
        # time only so that each one's seconds are printed as soon as it ends.
        ctx = ProbeContext(cfg, generator=generator)
        total = total_cpu = 0.0
        try:
            for name in names:
                cpu = time.process_time()
                report = run_suite(ctx, suite="all", only=[name])
                cpu = time.process_time() - cpu
                s = report.summaries[0]
                seconds.setdefault(name, []).append(report.seconds)
                cpu_seconds.setdefault(name, []).append(cpu)
                total += report.seconds
                total_cpu += cpu
                value = "-" if s.value is None else f"{s.value:.4g}"
                status = f"{s.verdict}" + (f" skipped {s.skipped}" if s.skipped else "")
                status += f" errors {s.errors}" if s.errors else ""
                say(f"  {name}: {report.seconds:.1f} s wall, {cpu:.1f} s cpu, value {value}, {status}")
                for result in report.per_client:
                    if result.value is not None and (samples := sample_line(result.evidence)):
                        say(f"    {result.client}: {result.value:.4g}, {samples}")
        finally:
            ctx.close()
        seconds.setdefault("TOTAL", []).append(total)
        cpu_seconds.setdefault("TOTAL", []).append(total_cpu)
        say(f"repeat {repeat + 1}: suite {total:.1f} s wall, {total_cpu:.1f} s cpu")
    return seconds, cpu_seconds


# Evidence keys that count what a sampled probe scored: whether its interval or its pool stopped it.
SAMPLE_KEYS = ("answers", "items", "items_available", "members", "samples_scored", "guesses")


def sample_line(evidence: dict) -> str:
    """A client's sample sizes and 95% interval, from its result's evidence ('' for an exact probe)."""
    parts = [f"{key} {evidence[key]}" for key in SAMPLE_KEYS if key in evidence]
    if "interval" in evidence:
        low, high = evidence["interval"]
        parts.append(f"interval [{low:.4g}, {high:.4g}]")
    return ", ".join(parts)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--world", choices=["realtext", "synth"], default="realtext")
    parser.add_argument("--topics", default=TOPICS, help="realtext clients (four by default)")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--only", default=None, help="comma-separated probes to time (default: all)")
    parser.add_argument("--local-steps", type=int, default=3, help="local DP-SGD steps in the round")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="extra config key=value")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/pfi-probes-bench"))
    parser.add_argument("--out", type=Path, default=None, help="append the printed lines here too")
    args = parser.parse_args(argv)
    topics = args.topics.split(",")
    sets = {
        "models.device": "cpu",
        "privacy.local_steps": args.local_steps,
        **({"privacy.audit_canaries": 64} if args.world == "realtext" else {}),
        **dict(kv.split("=", 1) for kv in args.sets),
    }
    say("$ " + shlex.join(["python", "bench/probes.py", *(argv if argv is not None else sys.argv[1:])]))
    say(f"# {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, default model, cpu, {json.dumps(sets)}")
    root = args.workdir / args.world
    build(args.world, root, sets, topics)
    say(f"uptime before: {uptime()}")
    only = args.only.split(",") if args.only else None
    seconds, cpu_seconds = time_suite(root, sets, args.repeats, only)
    say(f"uptime after:  {uptime()}")
    say()
    say(f"| probe | wall s (median of {args.repeats}) | cpu s (median) |")
    say("|---|---|---|")
    for probe, values in sorted(cpu_seconds.items(), key=lambda kv: -statistics.median(kv[1])):
        say(f"| {probe} | {statistics.median(seconds[probe]):.1f} | {statistics.median(values):.1f} |")
    say()
    if only is None:
        suite = statistics.median(seconds["TOTAL"])
        say(f"suite / target: {suite:.1f} s / {TARGET_SECONDS:.0f} s = {suite / TARGET_SECONDS:.2f}x")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        with args.out.open("a", encoding="utf-8") as out:
            out.write("\n".join(LINES) + "\n")


if __name__ == "__main__":
    main()
