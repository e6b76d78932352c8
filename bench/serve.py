"""The HTTP service under load, measured over loopback from this (separate) load-generating process.

    .venv/bin/python bench/serve.py [--tokens 16] [--load-seconds 120] [--json out.json] [--quick]

Starts ``pfi-rag serve`` as a subprocess on the default models (SmolLM2-135M-Instruct,
all-MiniLM-L6-v2) with 8 synthetic clients (each with its own key and documents, ingested over
HTTP), then measures:

(a) p50/p95 latency and throughput of ``POST /v1/generate`` (retrieval, generation, probes) at
    1, 4 and 8 concurrent clients, each client a thread sending its own questions in a loop;
(b) probe time as a share of request time (server-side probe ms / server-side request ms,
    median over every answer; target <= 5%);
(c) HTTP overhead: the same question answered over HTTP at concurrency 1 vs in this process
    (query embedding + ``Engine.generate`` on the same passages, same greedy tokens), medians of
    interleaved runs (target <= 1.05x);
(d) errors under a ``--load-seconds`` mixed load at 8 concurrent clients: generate, streamed
    generate, chat completions, search, document listing, plus a writer storing 1M-character
    documents (target 0);
(e) write time against document size: one document of 125k..1M characters without a space
    (the worst case for the PII scan), stored over HTTP, with the slowest ``/healthz`` answer
    during each write (linear: the seconds per MB stay flat; health answers in milliseconds).

``--quick`` skips (a)-(c).

Medians throughout; the machine is a shared, noisy 2-core box, so read ratios over absolutes.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from pfi_rag import layout
from pfi_rag.api.auth import KeyStore
from pfi_rag.config import Config, ModelsConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize

REPO = Path(__file__).resolve().parent.parent
CLIENTS = 8
LEVELS = (1, 4, 8)
WRITER = "writer"  # the client that stores large documents
WRITE_SIZES = (125_000, 250_000, 500_000, 1_000_000)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(root: Path, port: int, cache_dir: Path, threads: int) -> subprocess.Popen:
    env = {**os.environ, "PFI_RAG_MODELS__CACHE_DIR": str(cache_dir), "PFI_RAG_MODELS__THREADS": str(threads)}
    command = [sys.executable, "-m", "pfi_rag", "--data-root", str(root)]
    command += [
        "--set",
        "serving.requests_per_minute=1000000",
        "serve",
        "--port",
        str(port),
        "--log-level",
        "error",
    ]
    return subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def wait_ready(url: str, server: subprocess.Popen) -> float:
    started = time.perf_counter()
    while server.poll() is None:
        try:
            if httpx.get(f"{url}/readyz").status_code == 200:
                return time.perf_counter() - started
        except httpx.TransportError:
            pass
        time.sleep(0.25)
    raise SystemExit(f"the server exited ({server.returncode}): {server.stderr.read()[-2000:]}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


class Load:
    """Per-client questions, keys and a shared HTTP pool (one connection per worker thread)."""

    def __init__(self, url: str, keys: dict[str, str], questions: dict[str, list[str]], tokens: int):
        self.url, self.keys, self.questions, self.tokens = url, keys, questions, tokens
        self.http = httpx.Client(base_url=url, timeout=600, limits=httpx.Limits(max_connections=32))

    def headers(self, client: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[client]}"}

    def generate(self, client: str, question: str, tokens: int | None = None) -> dict:
        body = {"client_id": client, "prompt": question, "max_new_tokens": tokens or self.tokens}
        started = time.perf_counter()
        response = self.http.post("/v1/generate", json=body, headers=self.headers(client))
        elapsed = time.perf_counter() - started
        response.raise_for_status()
        return {**response.json(), "client_s": elapsed}


def run_level(load: Load, concurrency: int, per_worker: int) -> dict:
    """``concurrency`` clients, each sending ``per_worker`` questions back to back."""
    clients = sorted(load.keys)[:concurrency]
    answers: list[dict] = []
    lock = threading.Lock()

    def worker(client: str) -> None:
        for question in itertools.islice(itertools.cycle(load.questions[client]), per_worker):
            answer = load.generate(client, question)
            with lock:
                answers.append(answer)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker, args=(c,)) for c in clients]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - started
    latencies = [a["client_s"] for a in answers]
    tokens = sum(a["usage"]["completion_tokens"] for a in answers)
    return {
        "concurrency": concurrency,
        "requests": len(answers),
        "p50_s": statistics.median(latencies),
        "p95_s": percentile(latencies, 0.95),
        "requests_per_s": len(answers) / wall,
        "tokens_per_s": tokens / wall,
        "probe_share": [a["probes"]["elapsed_ms"] / a["usage"]["latency_ms"] for a in answers],
        "flagged": sum(a["probes"]["flagged"] for a in answers),
    }


def http_overhead(load: Load, cfg: Config, client: str, question: str, repeats: int) -> dict:
    """The same answer over HTTP and in this process, interleaved; medians."""
    import dataclasses

    from pfi_rag.models import Engine, GenerationRequest
    from pfi_rag.models.loading import load_embedder
    from pfi_rag.retriever import Hit
    from pfi_rag.retriever.embedding import embed

    embedder = load_embedder(cfg.models)
    engine = Engine.from_config(cfg)
    found = load.http.post(
        f"/v1/clients/{client}/search",
        json={"query": question, "k": cfg.retrieval.top_k},
        headers=load.headers(client),
    ).json()["hits"]
    hits = [
        Hit(
            chunk_id=h["chunk"],
            doc_id=h["doc_id"],
            text=h["text"],
            score=h["score"],
            metadata=h["metadata"],
            version=h["version"],
        )
        for h in found
    ]
    request = GenerationRequest(client, question, max_new_tokens=load.tokens)

    def in_process():
        started = time.perf_counter()
        embed(embedder, [question], cfg.retrieval.embed_batch_size)  # what the server's retrieval costs
        result = engine.generate(dataclasses.replace(request, passages=hits))
        return time.perf_counter() - started, result

    in_process()  # warm-up
    load.generate(client, question)
    http_s, local_s, same = [], [], []
    for _ in range(repeats):
        answer = load.generate(client, question)
        elapsed, result = in_process()
        http_s.append(answer["client_s"])
        local_s.append(elapsed)
        same.append(
            answer["text"] == result.text and answer["usage"]["completion_tokens"] == result.completion_tokens
        )
    return {
        "http_s": statistics.median(http_s),
        "in_process_s": statistics.median(local_s),
        "ratio": statistics.median(h / i for h, i in zip(http_s, local_s, strict=True)),
        "ratio_of_medians": statistics.median(http_s) / statistics.median(local_s),
        "same_answer": all(same),
        "tokens": load.tokens,
    }


def big_document(chars: int, i: int) -> dict:
    """``chars`` characters without a space (an e-mail-looking run: the old scan's worst case)."""
    prefix, suffix = f"{i}-", "@example.com"
    return {"id": f"big-{i}", "text": prefix + "x" * (chars - len(prefix) - len(suffix)) + suffix}


def write_scaling(load: Load) -> list[dict]:
    """Store one document of each size; time it, and poll /healthz meanwhile (its slowest answer)."""
    rows = []
    for i, chars in enumerate(WRITE_SIZES):
        done = threading.Event()
        health: list[float] = []

        def poll(done: threading.Event, health: list[float]) -> None:
            while not done.is_set():
                started = time.perf_counter()
                load.http.get("/healthz").raise_for_status()
                health.append(time.perf_counter() - started)
                time.sleep(0.05)

        poller = threading.Thread(target=poll, args=(done, health))
        poller.start()
        started = time.perf_counter()
        response = load.http.post(
            f"/v1/clients/{WRITER}/documents",
            json={"documents": [big_document(chars, i)]},
            headers=load.headers(WRITER),
        )
        seconds = time.perf_counter() - started
        done.set()
        poller.join()
        response.raise_for_status()
        rows.append(
            {
                "chars": chars,
                "write_s": seconds,
                "s_per_mb": seconds / (chars / 1e6),
                "health_max_s": max(health, default=None),
                "health_answers": len(health),
            }
        )
    return rows


def mixed_load(load: Load, seconds: float, concurrency: int) -> dict:
    """Every kind of request at once until the deadline; any non-2xx, exception or stream error counts."""
    deadline = time.monotonic() + seconds
    counts = {"requests": 0, "errors": 0}
    examples: list[str] = []
    lock = threading.Lock()

    def one(kind: str, client: str, question: str) -> None:
        headers = load.headers(client)
        if kind == "generate":
            load.generate(client, question, tokens=8 + hash(question) % 25)
        elif kind == "stream":
            body = {"client_id": client, "prompt": question, "max_new_tokens": load.tokens, "stream": True}
            with load.http.stream("POST", "/v1/generate", json=body, headers=headers) as response:
                response.raise_for_status()
                text = response.read().decode()
                if "event: error" in text or "event: result" not in text:
                    raise RuntimeError(f"stream ended badly: {text[-200:]}")
        elif kind == "chat":
            body = {
                "model": "pfi-rag",
                "messages": [{"role": "user", "content": question}],
                "max_tokens": load.tokens,
            }
            load.http.post("/v1/chat/completions", json=body, headers=headers).raise_for_status()
        elif kind == "search":
            load.http.post(
                f"/v1/clients/{client}/search", json={"query": question}, headers=headers
            ).raise_for_status()
        else:
            load.http.get(f"/v1/clients/{client}/documents", headers=headers).raise_for_status()

    def worker(client: str) -> None:
        kinds = itertools.cycle(["generate", "search", "stream", "generate", "chat", "documents"])
        for question in itertools.cycle(load.questions[client]):
            if time.monotonic() >= deadline:
                return
            try:
                one(next(kinds), client, question)
                failed = None
            except Exception as exc:  # counted, not raised: the point is how many
                failed = f"{type(exc).__name__}: {exc}"[:300]
            with lock:
                counts["requests"] += 1
                if failed:
                    counts["errors"] += 1
                    examples.append(failed)

    def writer() -> None:
        """Large documents, stored (and replaced) back to back while the others read and generate."""
        for i in itertools.count():
            if time.monotonic() >= deadline:
                return
            try:
                load.http.post(
                    f"/v1/clients/{WRITER}/documents",
                    json={"documents": [big_document(1_000_000 - i % 7, 100 + i % 3)]},
                    headers=load.headers(WRITER),
                ).raise_for_status()
                failed = None
            except Exception as exc:
                failed = f"writer {type(exc).__name__}: {exc}"[:300]
            with lock:
                counts["requests"] += 1
                counts["large_writes"] = counts.get("large_writes", 0) + 1
                if failed:
                    counts["errors"] += 1
                    examples.append(failed)

    readers = [c for c in sorted(load.keys) if c != WRITER][:concurrency]
    threads = [threading.Thread(target=worker, args=(c,)) for c in readers]
    threads.append(threading.Thread(target=writer))
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {**counts, "seconds": seconds, "concurrency": concurrency, "error_examples": examples[:5]}


def prepare(root: Path, url: str) -> tuple[dict[str, str], dict[str, list[str]]]:
    """Keys (hashes on disk) and documents (ingested over HTTP) for each synthetic client."""
    clients = sorted(synthesize(root, clients=CLIENTS, seed=0)["clients"])
    store = KeyStore(layout.keys_file(root))
    keys, questions = {}, {}
    for client in clients:
        keys[client] = store.create(client)[0]
        data = load_client_data(root, client)
        docs = [d.model_dump() for d in data.documents]
        for start in range(0, len(docs), 50):
            response = httpx.post(
                f"{url}/v1/clients/{client}/documents",
                json={"documents": docs[start : start + 50]},
                headers={"Authorization": f"Bearer {keys[client]}"},
                timeout=600,
            )
            response.raise_for_status()
        questions[client] = [qa.question for qa in data.qa] or ["What do my notes say?"]
    keys[WRITER] = store.create(WRITER)[0]
    return keys, questions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=16, help="New tokens per answer.")
    parser.add_argument("--per-worker", type=int, default=3, help="Questions each client sends per level.")
    parser.add_argument("--repeats", type=int, default=5, help="Interleaved pairs for the overhead ratio.")
    parser.add_argument("--load-seconds", type=float, default=120.0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="Torch threads, server and in-process alike (on the shared 2-core box, 2 threads contending "
        "with other jobs decoded 3-4x slower than 1).",
    )
    parser.add_argument(
        "--cache-dir", type=Path, default=REPO / ".model-cache", help="Converted model cache."
    )
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument("--quick", action="store_true", help="Skip latency levels and HTTP overhead.")
    args = parser.parse_args()

    cfg = Config(models=ModelsConfig(cache_dir=args.cache_dir, threads=args.threads))
    bench_started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="pfi-serve-bench-") as tmp:
        root = Path(tmp)
        port = free_port()
        url = f"http://127.0.0.1:{port}"
        server = start_server(root, port, args.cache_dir, args.threads)
        try:
            startup_s = wait_ready(url, server)
            print(f"server ready in {startup_s:.1f} s; ingesting {CLIENTS} clients over HTTP", flush=True)
            keys, questions = prepare(root, url)
            load = Load(url, keys, questions, args.tokens)
            first = sorted(questions)[0]
            load.generate(first, questions[first][0])  # warm-up
            writes = write_scaling(load)
            for row in writes:
                print(
                    f"  write {row['chars']:>9,} chars: {row['write_s']:.2f} s ({row['s_per_mb']:.2f} s/MB), "
                    f"slowest /healthz meanwhile {row['health_max_s'] or 0:.3f} s",
                    flush=True,
                )
            levels, overhead = [], None
            for concurrency in () if args.quick else LEVELS:
                level = run_level(load, concurrency, args.per_worker)
                levels.append(level)
                print(
                    f"  {concurrency} concurrent: p50 {level['p50_s']:.2f} s, p95 {level['p95_s']:.2f} s, "
                    f"{level['requests_per_s']:.2f} req/s, {level['tokens_per_s']:.1f} tok/s",
                    flush=True,
                )
            if not args.quick:
                overhead = http_overhead(load, cfg, first, questions[first][0], args.repeats)
                print(
                    f"  HTTP / in-process: {overhead['ratio']:.3f}x (same answer: {overhead['same_answer']})",
                    flush=True,
                )
            stress = mixed_load(load, args.load_seconds, CLIENTS)
            print(f"  mixed load: {stress['requests']} requests, {stress['errors']} errors", flush=True)
            metrics = load.http.get("/metrics").text
        finally:
            server.send_signal(signal.SIGINT)
            server.wait(60)

    shares = [s for level in levels for s in level.pop("probe_share")] or [float("nan")]
    results = {
        "command": " ".join(sys.argv),
        "writes": writes,
        "model": cfg.models.generator,
        "tokens_per_answer": args.tokens,
        "threads": args.threads,
        "server_startup_s": startup_s,
        "levels": levels,
        "probe_share_median": statistics.median(shares),
        "probe_share_p95": percentile(shares, 0.95),
        "http_overhead": overhead,
        "load": stress,
        "flagged_answers_metric": [
            line for line in metrics.splitlines() if line.startswith("pfi_rag_flagged_answers_total")
        ],
        "bench_s": time.perf_counter() - bench_started,
    }
    if levels:
        print()
        print("| concurrent clients | requests | p50 latency | p95 latency | requests/s | tokens/s |")
        print("|---|---|---|---|---|---|")
        for lv in levels:
            p50, p95, rps, tps = lv["p50_s"], lv["p95_s"], lv["requests_per_s"], lv["tokens_per_s"]
            cells = f"{p50:.2f} s | {p95:.2f} s | {rps:.2f} | {tps:.1f}"
            print(f"| {lv['concurrency']} | {lv['requests']} | {cells} |")
        print()
        median, p95 = results["probe_share_median"], results["probe_share_p95"]
        print(f"probe time / request time: median {median:.3%}, p95 {p95:.3%} (target <= 5%)")
    o = overhead
    if o is not None:
        print(
            f"HTTP vs in-process ({args.tokens} tokens, median of {args.repeats} pairs): {o['http_s']:.2f} s "
            f"vs {o['in_process_s']:.2f} s = {o['ratio']:.3f}x (target <= 1.05x); same: {o['same_answer']}"
        )
    print()
    print("| document (chars, no space) | write | s per MB | slowest /healthz during it |")
    print("|---|---|---|---|")
    for row in writes:
        print(
            f"| {row['chars']:,} | {row['write_s']:.2f} s | {row['s_per_mb']:.2f} | "
            f"{row['health_max_s'] or 0:.3f} s |"
        )
    print(
        f"mixed load, {CLIENTS} clients + a 1M-character writer, {args.load_seconds:.0f} s: "
        f"{stress['requests']} requests ({stress.get('large_writes', 0)} large writes), "
        f"{stress['errors']} errors (target 0)"
    )
    print(f"whole bench: {results['bench_s']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
