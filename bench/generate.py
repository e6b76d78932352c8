"""Personalized generation against plain transformers, measured in one run on the default model.

    .venv/bin/python bench/generate.py [--tokens 32] [--repeats 3] [--json out.json]

(a) End-to-end RAG answer: retrieval from the client's real index (``ClientStore.search``,
    all-MiniLM + FAISS), prompt building, the client's adapter and pfi-rag's decoding loop, vs
    plain ``model.generate`` of a separately loaded base model on the same final prompt and the
    same number of new tokens (target: within 1.15x).
(b) Throughput for 8 concurrent clients, each with its own adapter, prefill and decode timed
    apart: one batch of the 8 vs the same 8 requests one at a time (target: decode at least 3x),
    and a batch of 8 adapters vs a batch of 8 rows on one adapter (target: at least 0.8x), for
    gathered LoRA with the lean decode step (the default), the lean step with its batched steps
    on the one shared copy of the weights (``shared``, serving.batched_weights), gathered LoRA
    with transformers' own step (``hf-step``) and PEFT's mixed-adapter path, in the same run;
    then the batching scheduler end to end (concurrent submitters, continuous admission).
    Prompts carry one of the client's notes as a passage (no retrieval: this part measures
    decoding).
(c) One request's tokens/s and memory (RSS after loading, peak RSS sampled while decoding, and
    the process's max RSS, which includes loading) for eager vs sdpa attention at 1 and 2
    threads, each in a fresh process so peaks do not mix.

SmolLM2-135M-Instruct with ``ModelsConfig()`` defaults. Medians of ``--repeats`` runs after a
warm-up; the machine is shared, so read ratios rather than absolute times.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch

from pfi_rag.config import AdapterConfig, ModelsConfig, RetrievalConfig, ServingConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.models import BatchScheduler, Engine, GenerationRequest
from pfi_rag.models.adapters import client_adapter_dir, save_adapter
from pfi_rag.models.loading import load_embedder, load_generator
from pfi_rag.models.lora import attach_lora

CLIENTS = 8
# Passages per prompt in (b). On CPU a long prompt's prefill is compute-bound and costs the same
# batched or not, so it dilutes the decode speed-up that (b) is about; 1 short note keeps the
# prompt near 90 tokens (measured with 3 notes too, see README).
PASSAGES_B = 1


def timed(fn):
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def make_adapters(base, root: Path, clients: list[str]) -> None:
    """One LoRA adapter per client with random (small) B matrices: real weights, real compute."""
    model = attach_lora(copy.deepcopy(base), AdapterConfig())
    for seed, client in enumerate(clients):
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.01)
        save_adapter(model, client_adapter_dir(root, client))


def end_to_end(engine: Engine, baseline, store, question: str, tokens: int, repeats: int) -> dict:
    request = GenerationRequest("client-00", question, max_new_tokens=tokens, stop=[])

    def ours():
        hits = store.search(question, 4)
        return hits, engine.generate(dataclasses.replace(request, passages=hits))

    _, (hits, result) = timed(ours)  # warm-up; also fixes the final prompt and token count
    prompt = engine.prepare(dataclasses.replace(request, passages=hits))
    prompt.lease.release()
    ids = torch.tensor([prompt.prompt.input_ids], device=baseline.device)
    n = result.completion_tokens

    def plain():
        return baseline.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=n,
            min_new_tokens=n,
            do_sample=False,
        )

    timed(plain)
    ours_s, plain_s, retrieval_s = [], [], []
    for _ in range(repeats):  # interleaved, so drifting load hits both alike
        ours_s.append(timed(ours)[0])
        plain_s.append(timed(plain)[0])
        retrieval_s.append(timed(lambda: store.search(question, 4))[0])
    ours_med, plain_med = statistics.median(ours_s), statistics.median(plain_s)
    return {
        "tokens": n,
        "prompt_tokens": result.prompt_tokens,
        "passages": len(result.passages),
        "adapter": result.adapter.as_dict(),
        "pfi_rag_s": ours_med,
        "plain_generate_s": plain_med,
        "retrieval_s": statistics.median(retrieval_s),
        "ratio": ours_med / plain_med,
    }


def run_batch(engine: Engine, requests: list[GenerationRequest]) -> dict:
    """Prefill ``requests`` together, then decode them to the end; times and token counts apart."""
    jobs = [engine.prepare(r) for r in requests]
    batch = engine.new_batch()
    prefill_s, _ = timed(lambda: batch.add([job.row for job in jobs]))
    first = sum(1 for job in jobs if job.row.token_ids or job.row.finish_reason == "stop")
    decode_s = 0.0
    while len(batch):
        decode_s += timed(batch.step)[0]
    results = [engine.finish(job) for job in jobs]
    return {
        "prefill_s": prefill_s,
        "prefill_tokens": sum(r.prompt_tokens for r in results),
        "decode_s": decode_s,
        "decode_tokens": sum(r.completion_tokens for r in results) - first,  # the first came with prefill
        "token_ids": [r.token_ids for r in results],
    }


def batch_shapes(engines: dict[str, Engine], requests: list[GenerationRequest], repeats: int) -> dict:
    """Per engine: the requests one at a time, all in one batch, and all on one client's adapter."""
    same = [dataclasses.replace(r, client_id=requests[0].client_id) for r in requests]
    shapes = {"alone": lambda e: [run_batch(e, [r]) for r in requests],
              "batch": lambda e: [run_batch(e, requests)],
              "one_adapter_batch": lambda e: [run_batch(e, same)]}  # fmt: skip
    runs: dict = {(name, shape): [] for name in engines for shape in shapes}
    for engine in engines.values():  # warm-up: loads the adapters
        for shape in shapes.values():
            shape(engine)
    for _ in range(repeats):  # interleaved, so drifting load on the shared machine hits all alike
        for name, engine in engines.items():
            for shape, fn in shapes.items():
                parts = fn(engine)
                runs[name, shape].append({
                    key: sum(p[key] for p in parts)
                    for key in ("prefill_s", "prefill_tokens", "decode_s", "decode_tokens")
                } | {"token_ids": [t for p in parts for t in p["token_ids"]]})  # fmt: skip
    out = {}
    for name in engines:
        row = {}
        for shape in shapes:
            done = runs[name, shape]
            row[shape] = {
                "prefill_tok_s": statistics.median(d["prefill_tokens"] / d["prefill_s"] for d in done),
                "decode_tok_s": statistics.median(d["decode_tokens"] / d["decode_s"] for d in done),
            }
        row["decode_speedup"] = row["batch"]["decode_tok_s"] / row["alone"]["decode_tok_s"]
        row["prefill_speedup"] = row["batch"]["prefill_tok_s"] / row["alone"]["prefill_tok_s"]
        row["mixed_vs_one_adapter"] = row["batch"]["decode_tok_s"] / row["one_adapter_batch"]["decode_tok_s"]
        first = {shape: runs[name, shape][0]["token_ids"] for shape in shapes}
        row["batched_equals_alone"] = first["batch"] == first["alone"]
        row["token_ids"] = first
        out[name] = row
    return out


def concurrent_clients(engine: Engine, requests: list[GenerationRequest], repeats: int) -> dict:
    def one_at_a_time():
        return [engine.generate(r) for r in requests]

    def batched():
        with BatchScheduler(engine, max_batch_size=CLIENTS, max_wait_ms=50) as scheduler:
            futures: list = [None] * len(requests)

            def send(i: int) -> None:  # concurrent submitters, as HTTP handlers would be
                futures[i] = scheduler.submit(requests[i])

            threads = [threading.Thread(target=send, args=(i,)) for i in range(len(requests))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            return [f.result() for f in futures]

    for r in requests:  # warm-up: loads the 8 adapters
        engine.generate(dataclasses.replace(r, max_new_tokens=1))
    rates = {"one_at_a_time": [], "batched": []}
    same = True
    for _ in range(repeats):
        for name, fn in (("one_at_a_time", one_at_a_time), ("batched", batched)):
            seconds, results = timed(fn)
            rates[name].append(sum(r.completion_tokens for r in results) / seconds)
            if name == "one_at_a_time":
                reference = [r.token_ids for r in results]
            else:
                same = same and [r.token_ids for r in results] == reference
    one, many = statistics.median(rates["one_at_a_time"]), statistics.median(rates["batched"])
    prompt_tokens = []
    for request in requests:
        job = engine.prepare(request)
        job.lease.release()
        prompt_tokens.append(len(job.prompt.input_ids))
    return {
        "prompt_tokens": statistics.median(prompt_tokens),
        "clients": len(requests),
        "adapters": len({r.client_id for r in requests}),
        "one_at_a_time_tok_s": one,
        "batched_tok_s": many,
        "speedup": many / one,
        "batched_equals_alone": same,
    }


def single_request(attn: str, threads: int, tokens: int, repeats: int) -> dict:
    """Runs in its own process: one request's decode speed and the process's peak memory."""
    cfg = ModelsConfig(attn_implementation=attn, threads=threads)
    engine = Engine(*load_generator(cfg)[:2], data_root=Path(tempfile.mkdtemp()))
    request = GenerationRequest("solo", "Tell me about my week.", passages=[], max_new_tokens=tokens)
    engine.generate(dataclasses.replace(request, max_new_tokens=2))
    process = psutil.Process()
    loaded_rss = process.memory_info().rss
    peak = [loaded_rss]
    done = threading.Event()

    def sample_rss() -> None:  # ru_maxrss cannot be reset after loading, so sample while decoding
        while not done.wait(0.005):
            peak[0] = max(peak[0], process.memory_info().rss)

    sampler = threading.Thread(target=sample_rss)
    sampler.start()
    rates = []
    for _ in range(repeats):
        seconds, result = timed(lambda: engine.generate(request))
        rates.append(result.completion_tokens / seconds)
    done.set()
    sampler.join()
    return {
        "attn": attn,
        "threads": torch.get_num_threads(),
        "tok_s": statistics.median(rates),
        "rss_after_load_mib": loaded_rss / 2**20,
        "decode_peak_rss_mib": peak[0] / 2**20,
        "max_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path, help="Also write the results here.")
    parser.add_argument(
        "--threads", type=int, help="torch threads for (a) and (b) (default: models.threads, i.e. torch's)"
    )
    parser.add_argument("--parts", default="abc", help="Which measurements to run (default: abc).")
    parser.add_argument("--single", nargs=2, metavar=("ATTN", "THREADS"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.single:
        print(json.dumps(single_request(args.single[0], int(args.single[1]), args.tokens, args.repeats)))
        return

    started = time.perf_counter()
    root = Path(tempfile.mkdtemp(prefix="pfi-bench-"))
    synthesize(root, clients=CLIENTS, seed=0)
    clients = [f"client-{i:02d}" for i in range(CLIENTS)]
    cfg = ModelsConfig(threads=args.threads)
    model, tokenizer, runtime = load_generator(cfg)
    baseline, _, _ = load_generator(cfg)
    make_adapters(model, root, clients)
    peft_model = copy.deepcopy(model) if "b" in args.parts else None
    hf_model = copy.deepcopy(model) if "b" in args.parts else None  # gathered, transformers' step
    shared_model = copy.deepcopy(model) if "b" in args.parts else None  # lean, one copy of weights
    engine = Engine(model, tokenizer, data_root=root, serving=ServingConfig(), adapter=AdapterConfig())
    print(
        f"model {cfg.generator} on {runtime.device}, {runtime.dtype}, attn={runtime.attn_implementation}, "
        f"{torch.get_num_threads()} threads; {args.tokens} new tokens, median of {args.repeats}"
    )

    a = b = None
    c = []
    if "a" in args.parts:
        a = _part_a(cfg, engine, baseline, root, args)
    del baseline
    if "b" in args.parts:
        serving = ServingConfig(gathered_lora=False)
        peft = Engine(peft_model, tokenizer, data_root=root, serving=serving, adapter=AdapterConfig())
        serving = ServingConfig(decode_step="transformers")
        hf_step = Engine(hf_model, tokenizer, data_root=root, serving=serving, adapter=AdapterConfig())
        serving = ServingConfig(batched_weights="shared")
        shared = Engine(shared_model, tokenizer, data_root=root, serving=serving, adapter=AdapterConfig())
        engines = {"gathered": engine, "shared": shared, "hf-step": hf_step, "peft": peft}
        b = _part_b(engines, root, clients, args)
        del peft, peft_model, hf_step, hf_model, shared, shared_model, engines
    del engine, model
    if "c" in args.parts:
        c = _part_c(args)
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps({"end_to_end": a, "concurrent": b, "single": c}, indent=2) + "\n")


def _part_a(cfg: ModelsConfig, engine: Engine, baseline, root: Path, args) -> dict:
    from pfi_rag.retriever import ClientStore

    data = load_client_data(root, "client-00")
    with ClientStore.open(root, "client-00", RetrievalConfig(), load_embedder(cfg)) as store:
        store.add_documents(data.documents)
        a = end_to_end(engine, baseline, store, data.qa[0].question, args.tokens, args.repeats)
    print(
        f"(a) end-to-end RAG answer ({a['tokens']} tokens, {a['prompt_tokens']}-token prompt, "
        f"{a['passages']} passages, real ClientStore retrieval): pfi-rag {a['pfi_rag_s']:.2f} s vs plain "
        f"generate {a['plain_generate_s']:.2f} s = {a['ratio']:.2f}x (target <= 1.15x; retrieval "
        f"{a['retrieval_s'] * 1000:.0f} ms of it)"
    )
    return a


def _part_b(engines: dict[str, Engine], root: Path, clients: list[str], args) -> dict:
    # Every row decodes exactly --tokens tokens (end of sequence banned, as vLLM's benchmark's
    # ignore_eos): rows ending early would shrink the batch and measure the prompts, not decoding.
    no_eos = [(eos, -100.0) for eos in engines["gathered"].eos_ids]
    requests = []
    for client in clients:
        client_data = load_client_data(root, client)
        requests.append(
            GenerationRequest(
                client,
                client_data.qa[0].question,
                passages=_passages(client_data),
                max_new_tokens=args.tokens,
                logit_bias=no_eos,
            )
        )
    shapes = batch_shapes(engines, requests, args.repeats)
    print(f"(b) {len(requests)} clients, {len(requests)} adapters, prefill and decode apart:")
    for name, row in shapes.items():
        print(
            f"    {name:<8} decode: batch of 8 adapters {row['batch']['decode_tok_s']:6.1f} tok/s vs one "
            f"at a time {row['alone']['decode_tok_s']:5.1f} = {row['decode_speedup']:.2f}x (target >= 3x); "
            f"8 rows on one adapter {row['one_adapter_batch']['decode_tok_s']:6.1f} tok/s, mixed/one = "
            f"{row['mixed_vs_one_adapter']:.2f}x (target >= 0.8x)"
        )
        print(
            f"    {name:<8} prefill: batch {row['batch']['prefill_tok_s']:6.0f} tok/s vs one at a time "
            f"{row['alone']['prefill_tok_s']:5.0f} = {row['prefill_speedup']:.2f}x; "
            f"greedy tokens identical batched and alone: {row['batched_equals_alone']}"
        )
    print(
        f"    gathered vs peft, batch of 8 adapters, decode: "
        f"{shapes['gathered']['batch']['decode_tok_s'] / shapes['peft']['batch']['decode_tok_s']:.2f}x"
    )
    if "hf-step" in shapes:
        lean, hf = shapes["gathered"], shapes["hf-step"]
        print(
            "    lean decode step (default) vs transformers' step, gathered LoRA, decode: batch of 8 "
            f"adapters {lean['batch']['decode_tok_s'] / hf['batch']['decode_tok_s']:.2f}x, one at a time "
            f"{lean['alone']['decode_tok_s'] / hf['alone']['decode_tok_s']:.2f}x; same greedy tokens: "
            f"{lean['token_ids'] == hf['token_ids']}"
        )
    if "shared" in shapes:
        packed, one_copy = shapes["gathered"], shapes["shared"]
        gain = {
            s: packed[s]["decode_tok_s"] / one_copy[s]["decode_tok_s"] for s in ("batch", "one_adapter_batch")
        }
        print(
            "    packed batched weights (default) vs the one shared copy, lean step, decode: batch of 8 "
            f"adapters {gain['batch']:.2f}x, 8 rows on one adapter {gain['one_adapter_batch']:.2f}x; "
            f"same greedy tokens: {packed['token_ids'] == one_copy['token_ids']}"
        )
    b = concurrent_clients(engines["gathered"], requests, args.repeats)
    b["shapes"] = shapes
    print(
        f"    scheduler, {b['clients']} concurrent clients, {b['adapters']} adapters, "
        f"~{b['prompt_tokens']:.0f}-token prompts, prefill+decode: batched {b['batched_tok_s']:.1f} "
        f"tok/s vs one at a time {b['one_at_a_time_tok_s']:.1f} tok/s = {b['speedup']:.2f}x (target >= 3x); "
        f"greedy tokens identical: {b['batched_equals_alone']}"
    )
    return b


def _part_c(args) -> list[dict]:
    c = []
    for attn in ("eager", "sdpa"):
        for threads in (1, 2):
            out = subprocess.run(
                [sys.executable, __file__, "--single", attn, str(threads), "--tokens", str(args.tokens),
                 "--repeats", str(args.repeats)],
                capture_output=True, text=True, check=True,
            )  # fmt: skip
            c.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("(c) one request, fresh process each:")
    for row in c:
        print(
            f"    attn={row['attn']:<5} threads={row['threads']}: {row['tok_s']:5.1f} tok/s, "
            f"RSS {row['rss_after_load_mib']:.0f} MiB loaded, {row['decode_peak_rss_mib']:.0f} MiB peak "
            f"while decoding ({row['max_rss_mib']:.0f} MiB max incl. loading)"
        )
    return c


def _passages(data) -> list:
    from pfi_rag.models.prompting import UsedPassage

    documents = data.documents[:PASSAGES_B]
    return [
        UsedPassage(number=i + 1, doc_id=d.id, text=d.text, score=1.0 - i / 10)
        for i, d in enumerate(documents)
    ]


if __name__ == "__main__":
    main()
