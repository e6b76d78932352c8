"""Start-up time of the `pfi-rag` commands that need no model.

    .venv/bin/python bench/cli.py [--repeats 7] [--out bench/results/cli.txt]

Each command runs as a fresh process (the way a user runs it) in a scratch data root, ``repeats``
times; the median, minimum and maximum wall time are printed. A second table lists which heavy
libraries each command imported (read from ``python -X importtime``), so a regression shows its
cause. Wall times depend on the machine's load; the child's CPU time (user + system) does much
less, and on an idle machine the wall time of these single-threaded start-ups is close to it.
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEAVY = (
    "torch",
    "transformers",
    "faiss",
    "flwr",
    "sentence_transformers",
    "fastapi",
    "peft",
    "opacus",
    "ray",
)


def commands(data_root: Path) -> list[list[str]]:
    root = ["--data-root", str(data_root)]
    return [
        ["--help"],
        [*root, "config", "show"],
        [*root, "clients", "create", "{client}"],
        [*root, "docs", "--client", "client-00", "list"],
    ]


def run(args: list[str], *, importtime: bool = False) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) of the child, and its stderr."""
    python = [sys.executable, *(["-X", "importtime"] if importtime else []), "-m", "pfi_rag"]
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    done = subprocess.run([*python, *args], capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"pfi-rag {shlex.join(args)} failed ({done.returncode}): {done.stderr[-500:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return elapsed, cpu, done.stderr


def heavy_imports(stderr: str) -> list[str]:
    top = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line:
            name = line.rsplit("|", 1)[1].strip().split(".")[0]
            if name in HEAVY:
                top.add(name)
    return sorted(top)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path, default=None, help="Also write the report here.")
    args = parser.parse_args()

    lines = [
        f"Command: {shlex.join(['python', 'bench/cli.py', *sys.argv[1:]])}",
        f"Machine: {platform.machine()}, {os.cpu_count()} CPUs, {platform.python_implementation()} "
        f"{platform.python_version()}; 1-minute load average {os.getloadavg()[0]:.1f} at the start; "
        f"each command a fresh process, {args.repeats} runs",
        "",
        "| command | median wall s | min | max | median CPU s | heavy libraries imported |",
        "|---|---|---|---|---|---|",
    ]
    with tempfile.TemporaryDirectory() as scratch:
        data_root = Path(scratch) / "pfi-data"
        # A client with a real store to list (this ingest loads the embedder once; not timed).
        run(["--data-root", str(data_root), "ingest", "--client", "client-00", "--text", "I live in Bergen."])
        for template in commands(data_root):
            times, cpu = [], []
            for i in range(args.repeats):
                cmd = [part.replace("{client}", f"bench-{i}") for part in template]
                wall, used, _ = run(cmd)
                times.append(wall)
                cpu.append(used)
            cmd = [part.replace("{client}", "bench-imports") for part in template]
            heavy = heavy_imports(run(cmd, importtime=True)[2])
            kept = [p for p in template if p not in ("--data-root", str(data_root))]
            shown = "pfi-rag " + " ".join(kept).replace("{client}", "ID")
            lines.append(
                f"| `{shown}` | {statistics.median(times):.2f} | {min(times):.2f} | {max(times):.2f} | "
                f"{statistics.median(cpu):.2f} | {', '.join(heavy) or 'none'} |"
            )
    report = "\n".join(lines) + "\n"
    print(report, end="")
    if args.out is not None:
        args.out.write_text(report, encoding="utf-8")


if __name__ == "__main__":
    main()
