"""The steps of `pfi-rag demo`: the whole product end to end on the built-in defaults.

1. synthesise 4 clients' personal data; 2. index each client's documents in its own store;
3. federate a few rounds of DP training through the Flower simulation launcher; 4. serve over
HTTP on loopback and ask two clients the same question; 5. run the probe suite and write its
report; 6. stop everything and list the artefacts.

Each step prints what it is doing and why for the person watching; :func:`run_demo` runs them
in order on a config whose data root is the demo's own directory (replaced whole on each run:
see :func:`prepare_root`). The presets that keep it to minutes on a 2-core CPU are :data:`FULL`
and :data:`QUICK`; ``--set`` overrides any of their settings. It sits on top of every layer (it
starts the HTTP service), so it lives with the command that runs it (``cli/demo.py``).
"""

from __future__ import annotations

import fcntl
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from pfi_rag import layout
from pfi_rag.config import Config
from pfi_rag.presets import Preset
from pfi_rag.storage import atomic_write_json

DEMO_MARKER = ".pfi-rag-demo"
CLIENTS = 4
ASKED = ("client-00", "client-01")  # the two clients who ask the same question over HTTP
PASSAGES = 2  # retrieved per HTTP answer: a 135M model answers better from fewer, better passages
# The probes the demo runs: every layer of the product, the cheap ones on a CPU (the whole suite
# costs about 13 CPU-minutes on the default model, bench/results/probes-suite.txt);
# `pfi-rag probe --suite all` runs the rest.
DEMO_PROBES = (
    "fairness",
    "exposure",
    "budget",
    "dp_collapse",
    "retrieval_hit",
    "stale",
    "update_outliers",
    "silent_failures",
)


class DemoError(Exception):
    """The demo cannot start as asked (its root is someone else's, or another demo is running)."""


# What the demo changes from the defaults so it finishes in minutes on a small CPU.
FULL = Preset(
    name="full",
    clients=CLIENTS,
    rounds=2,
    local_steps=3,
    batch_size=4,
    max_seq_len=64,
    epsilon_per_round=2.0,
    max_new_tokens=48,
    answer_tokens=16,
    exposure_samples=64,
    cloze_items=64,
    probes=DEMO_PROBES,
)
QUICK = replace(
    FULL,
    name="quick",
    rounds=1,
    local_steps=2,
    max_seq_len=48,
    max_new_tokens=24,
    answer_tokens=4,
    exposure_samples=16,
    cloze_items=24,
)


@dataclass
class Answer:
    """One client's answer over HTTP: the response body and the ground truth it should state."""

    client_id: str
    question: str
    expected: str
    body: dict[str, Any]


@dataclass
class DemoResult:
    root: Path
    summary: Any  # federation.records.FederationSummary (launcher.summarize)
    answers: list[Answer]
    refused_status: int  # a client asking with another client's id
    report: Any  # pfi_rag.probes.Report
    artefacts: dict[str, Path]


# -- the data root ------------------------------------------------------------------------------


@contextmanager
def demo_lock(parent: Path) -> Iterator[None]:
    """One demo per data root at a time: a second one would replace the first's files mid-run."""
    parent.mkdir(parents=True, exist_ok=True)
    with open(layout.demo_lock_file(parent), "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise DemoError(f"another `pfi-rag demo` is running in {parent}; wait for it") from None
        yield


def prepare_root(root: Path) -> Path:
    """Replace a previous demo's root whole, so two runs never mix; refuse a directory it did not make."""
    if root.exists():
        if not (root / DEMO_MARKER).exists():
            raise DemoError(
                f"{root} exists and was not made by `pfi-rag demo`; pass --data-root to another directory"
            )
        shutil.rmtree(root)
    root.mkdir(parents=True)
    (root / DEMO_MARKER).write_text("made by pfi-rag demo; replaced on the next run\n")
    return root


# -- the steps ----------------------------------------------------------------------------------


def step(out: Console, number: int, title: str, why: str) -> float:
    out.rule(f"[bold]step {number}/6: {title}")
    out.print(why, style="dim", highlight=False)
    return time.perf_counter()


def done(out: Console, started: float) -> None:
    out.print(f"[green]done[/] in {time.perf_counter() - started:.1f} s")


def synthesize_clients(cfg: Config, out: Console) -> dict[str, Any]:
    """Step 1: four clients' personal data with planted ground truth."""
    from pfi_rag.data.records import load_client_data
    from pfi_rag.data.synth import synthesize

    started = step(
        out,
        1,
        "synthesise personal data for 4 clients",
        "Each client gets notes, messages and emails stating its persona's facts (some with planted "
        "secrets, 'canaries'), held-out questions, instruction pairs for training, and a dated update "
        "that supersedes one fact. Sizes are skewed on purpose: one client is tiny.",
    )
    manifest = synthesize(cfg.data_root, clients=CLIENTS, seed=cfg.seed)
    table = Table("client", "documents", "questions", "instructions", box=None)
    for client in sorted(manifest["clients"]):
        data = load_client_data(cfg.data_root, client)
        table.add_row(client, str(len(data.documents)), str(len(data.qa)), str(len(data.instructions)))
    out.print(table)
    done(out, started)
    return manifest


def ingest_documents(cfg: Config, embedder, out: Console) -> dict[str, dict[str, Any]]:
    """Step 2: each client's documents, then its dated update, into its own FAISS index."""
    from pfi_rag.data.records import load_client_data
    from pfi_rag.layout import list_clients
    from pfi_rag.retriever import ClientStore

    started = step(
        out,
        2,
        "index each client's documents in its own store",
        "Documents are chunked, embedded with all-MiniLM-L6-v2 and kept in a FAISS index + SQLite "
        "docstore under clients/<id>/index/: they never leave the client. The dated update then "
        "supersedes an older fact (the old version stays in the docstore for the staleness probe).",
    )
    stats = {}
    for client in list_clients(cfg.data_root):
        data = load_client_data(cfg.data_root, client)
        # The store holds a per-client lock; `with` releases it before the server opens the store.
        with ClientStore.open(cfg.data_root, client, cfg.retrieval, embedder) as store:
            added = store.add_documents(data.documents, source="documents.jsonl")
            updated = store.add_documents(data.updates, source="updates.jsonl")
            stats[client] = store.stats()
        out.print(
            f"{client}: {added.added} documents in {added.chunks} chunks, "
            f"{updated.superseded} superseded by an update"
        )
    done(out, started)
    return stats


def federate(cfg: Config, out: Console):  # -> federation.records.FederationSummary
    """Step 3: DP-SGD rounds on Flower's simulation runtime; the summary holds each client's epsilon."""
    from pfi_rag.federation.launcher import loss_caption, run_simulation, show_loss, summarize
    from pfi_rag.layout import simulation_log_dir

    started = step(
        out,
        3,
        f"federate {cfg.federation.rounds} round(s) of DP training with Flower",
        f"Each round, every client trains its LoRA adapter on its own records with DP-SGD (Opacus: "
        f"{cfg.privacy.local_steps} steps, each record's gradient clipped to "
        f"{cfg.privacy.max_grad_norm:g}, Gaussian noise solved to spend epsilon "
        f"{cfg.privacy.epsilon_per_round:g} per round) and sends only the noisy update of the shared "
        f"part; the server averages them ({cfg.federation.strategy}). Each client's privacy ledger "
        f"composes its spends across rounds (budget {cfg.privacy.epsilon_max:g}). A private Flower "
        f"SuperLink, its simulation runtime and Ray start first (~20 s); clients train one per CPU core, "
        f"{os.cpu_count()} at a time on this machine.",
    )

    def on_round(record) -> None:  # a federation.records.RoundRecord
        out.print(
            f"round {record.round}: {len(record.results)} results, {len(record.failures)} "
            f"failures, aggregate update norm {record.aggregate_norm:.3g}, {record.seconds:.0f} s"
        )

    out.print(f"starting Flower and {CLIENTS} virtual clients; a line per round as it ends ...")
    with out.status(f"federating {CLIENTS} clients, {cfg.federation.rounds} round(s)"):
        records = run_simulation(cfg, on_round=on_round)
    out.print(f"Flower's and Ray's output: {simulation_log_dir(cfg.data_root)}", soft_wrap=True)
    summary = summarize(cfg, records)
    table = Table(
        "client",
        "rounds",
        "epsilon spent",
        "delta",
        "loss before",
        "loss after",
        box=None,
        caption=loss_caption(summary),
    )
    for client, row in sorted(summary.clients.items()):
        table.add_row(
            client,
            str(row.rounds),
            f"{row.epsilon:.2f}",
            f"{_delta(cfg, client):.1e}",
            show_loss(row, "loss_before"),
            show_loss(row, "loss_after"),
        )
    out.print(table)
    done(out, started)
    return summary


def ask_over_http(cfg: Config, embedder, out: Console) -> tuple[list[Answer], int]:
    """Step 4: serve on a free loopback port, issue two keys, ask the same question as two clients."""
    import httpx

    from pfi_rag.api import create_app
    from pfi_rag.api.auth import KeyStore, keys_path
    from pfi_rag.api.server import ServerThread

    started = step(
        out,
        4,
        "serve personalized answers over HTTP",
        "The FastAPI service loads the base model once; each request runs with the asking client's "
        "adapter and the passages retrieved from that client's own index, and comes back with "
        "citations and serve-time probes (grounding, retrieval confidence, cross-client copies, PII). "
        "API keys are per client; only their hashes are stored.",
    )
    keys = KeyStore(keys_path(cfg.data_root, cfg.serving.keys_file))
    issued = {client: keys.create(client)[0] for client in ASKED}
    for client, key in issued.items():
        out.print(f"`pfi-rag clients create {client}` -> key {key[:14]}... (only its hash is stored)")
    question, expected = _shared_question(cfg)
    answers = []
    with out.status("loading the model into the server"):
        server = ServerThread(create_app(cfg, embedder=embedder), host="127.0.0.1", port=0).start()
    try:
        out.print(f"serving on {server.url} (OpenAPI at {server.url}/docs)")
        # Generation is minutes on a loaded CPU at worst: no read timeout, a short connect one.
        with httpx.Client(base_url=server.url, timeout=httpx.Timeout(None, connect=10.0)) as http:
            for client, key in issued.items():
                with out.status(f"{client} asks: {question}"):
                    response = http.post(
                        "/v1/generate",
                        json={"client_id": client, "prompt": question, "passages": PASSAGES},
                        headers={"Authorization": f"Bearer {key}"},
                    )
                response.raise_for_status()
                answers.append(Answer(client, question, expected[client], response.json()))
                print_answer(out, answers[-1])
            other = http.post(
                "/v1/generate",
                json={"client_id": ASKED[1], "prompt": question},
                headers={"Authorization": f"Bearer {issued[ASKED[0]]}"},
            )
        out.print(
            f"{ASKED[0]}'s key asking as {ASKED[1]}: HTTP {other.status_code} "
            "(another client's data looks the same as missing data)"
        )
    finally:
        server.stop()
    out.print("server stopped")
    atomic_write_json(layout.answers_file(cfg.data_root), [asdict(answer) for answer in answers])
    done(out, started)
    return answers, other.status_code


def print_answer(out: Console, answer: Answer) -> None:
    body = answer.body
    adapter = body["adapter"]
    probes = body["probes"]
    out.print(f"\n[bold]{answer.client_id}[/] asks: {answer.question}  (its notes say: {answer.expected})")
    out.print(f"[bold]answer:[/] {body['text'].strip()}", highlight=False)
    out.print(f"adapter: {adapter['kind']} v{adapter['version']} (round {adapter['round']})")
    for c in body["citations"]:
        mark = " cited" if c["cited"] else ""
        out.print(f"  [{c['number']}] {c['doc_id']} (score {c['score']:.2f}){mark}", highlight=False)
    flags = ", ".join(probes["flags"]) or "none"
    out.print(
        f"probes: flagged={probes['flagged']} ({flags}), grounding {_fmt(probes['grounding'])}, "
        f"retrieval confidence {_fmt(probes['retrieval_confidence'])}, "
        f"cross-client spans {probes['cross_client_spans']}"
    )


def run_probes(cfg: Config, probes: tuple[str, ...] | None, out: Console):
    """Step 5: silent-failure probes over every client and the federation, and their report."""
    from pfi_rag.probes import ProbeContext, run_suite
    from pfi_rag.probes.report import write_report

    chosen = "every probe" if probes is None else f"{len(probes)} probes"
    started = step(
        out,
        5,
        f"audit for silent failures ({chosen})",
        "Federated metrics (average loss, round results) do not show how personalization fails. The "
        "probes read each client's adapter, index and ledger and the round history: fairness across "
        "clients, canary exposure (memorised secrets), privacy theatre in the ledgers, DP noise that "
        "wipes out personalization, retrieval misses and stale facts, broken updates and silent "
        f"clients. The rest of the suite (bias, calibration, capability, refusals, membership, "
        f"leakage, out-of-domain, erosion, groundedness) runs with `pfi-rag --data-root "
        f"{cfg.data_root} probe --suite all`.",
    )
    context = ProbeContext(cfg)
    current = {"probe": ""}

    def progress(label: str) -> None:
        name = label.split()[0]
        if name != current["probe"]:  # one line per probe, not per client
            current["probe"] = name
            out.print(f"probe {name} ...", highlight=False)

    try:
        report = run_suite(context, suite="all", only=list(probes) if probes else None, on_step=progress)
    finally:
        context.close()
    _, html_path = write_report(report, layout.report_dir(cfg.data_root))
    table = Table("probe", "mode", "worst / value", "fails when", "verdict", box=None)
    for s in report.summaries:
        value = "-" if s.value is None else f"{s.value:.3g}"
        verdict = str(s.verdict)
        if verdict == "skip":
            verdict += f" ({next(iter(s.skipped.values()), '')})"
        table.add_row(s.probe, s.mode, value, f"{'>' if s.fails_above else '<'} {s.threshold:g}", verdict)
    out.print(table)
    failed = [s.probe for s in report.summaries if str(s.verdict) in ("fail", "error")]
    verdict = f"flagged: {', '.join(failed)}" if failed else "every probe passed"
    out.print(f"report: {html_path}  ({verdict}; `pfi-rag probe` exits 1 on a failure: a deployment gate)")
    done(out, started)
    return report


def list_artefacts(cfg: Config, out: Console) -> dict[str, Path]:
    """Step 6: nothing is left running; where everything the demo made lives."""
    started = step(
        out,
        6,
        "shut down and list the artefacts",
        "The HTTP server stopped after its answers, and Flower's SuperLink, simulation runtime and Ray "
        "after the last round; the probes closed the client stores. Everything the demo made is under "
        "its data root, replaced on the next run.",
    )
    root = Path(cfg.data_root)
    client = layout.list_clients(root)[0]  # each client's files are laid out as this one's
    artefacts = {
        "data root": root,
        f"{client}'s data": layout.client_data_dir(root, client),
        f"{client}'s index": layout.client_index_dir(root, client),
        f"{client}'s adapter": layout.client_adapter_dir(root, client),
        f"{client}'s privacy ledger": layout.client_ledger_file(root, client),
        "global adapter": layout.global_adapter_dir(root),
        "round history": layout.rounds_dir(root),
        "federation summary": layout.summary_file(root),
        "API key hashes": layout.keys_file(root),
        "HTTP answers": layout.answers_file(root),
        "probe report": layout.report_dir(root) / "report.html",
        "probe report (JSON)": layout.report_dir(root) / "report.json",
        "ground truth": layout.manifest_file(root),
        "Flower's and Ray's output": layout.simulation_log_dir(root),
    }
    table = Table("artefact", "path", box=None)
    for name, path in artefacts.items():
        table.add_row(name, str(path))
    out.print(table)
    done(out, started)
    return artefacts


def run_demo(
    cfg: Config, preset: Preset, out: Console, on_root: Callable[[Path], None] | None = None
) -> DemoResult:
    """Every step, in order, in a freshly replaced ``<data_root>/demo``; ``on_root`` hears that
    directory once it exists (the CLI routes the libraries' log output into it)."""
    from pfi_rag.models.loading import load_embedder

    root = layout.demo_root(cfg.data_root).absolute()  # printed paths work from any directory
    with demo_lock(Path(cfg.data_root)):
        prepare_root(root)
        if on_root is not None:
            on_root(root)
        cfg = cfg.model_copy(deep=True)
        cfg.data_root = root
        out.print(
            f"pfi-rag demo in {root} (generator {cfg.models.generator}, embedder {cfg.models.embedder}, "
            f"{os.cpu_count()} CPUs)"
        )
        synthesize_clients(cfg, out)
        embedder = load_embedder(cfg.models)
        ingest_documents(cfg, embedder, out)
        summary = federate(cfg, out)
        answers, refused = ask_over_http(cfg, embedder, out)
        report = run_probes(cfg, preset.probes, out)
        artefacts = list_artefacts(cfg, out)
    return DemoResult(root, summary, answers, refused, report, artefacts)


# -- helpers ------------------------------------------------------------------------------------


def _shared_question(cfg: Config) -> tuple[str, dict[str, str]]:
    """A held-out question both asking clients hold, and each one's true answer."""
    from pfi_rag.data.records import load_client_data

    qa = {
        client: {p.question: p.answer for p in load_client_data(cfg.data_root, client).qa} for client in ASKED
    }
    first, second = (qa[client] for client in ASKED)
    question = next(q for q in first if q in second)
    return question, {client: qa[client][question] for client in ASKED}


def _delta(cfg: Config, client: str) -> float:
    from pfi_rag.privacy import PrivacyLedger

    return PrivacyLedger.open(cfg.data_root, client, cfg.privacy).delta or 0.0


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3g}"
