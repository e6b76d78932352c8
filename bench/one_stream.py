"""One decode stream on CPU against its memory-bandwidth limit, per weight format, with its quality cost.

    .venv/bin/python bench/one_stream.py [--tokens 32] [--repeats 3] [--json out.json]

One request decoding alone reads every weight once per token, so its speed is bounded by
memory bandwidth / weight bytes. For each format (fp32, bf16; the LoRA path stays fp32), in a
fresh process each: decode tokens/s (prefill excluded) of one greedy request through the
serving engine, the
measured copy bandwidth of this machine at that moment (a 256 MiB tensor copied, read + write)
and the limit it implies, and the quality cost: mean negative log-likelihood per token of the
synthetic QA's held-out answers given their prompt with the right note, against fp32's, and how
many greedy answers match fp32's token for token.

The machine is shared, so bandwidth is measured beside each run and ratios matter more than
absolute speeds.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

FORMATS = ["float32", "bfloat16"]


def bandwidth_gb_s(repeats: int = 5) -> float:
    """Copy bandwidth (bytes read + written per second) of one thread on a 256 MiB tensor."""
    source = torch.ones(64 * 2**20)  # 256 MiB of float32
    target = torch.empty_like(source)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        target.copy_(source)
        times.append(time.perf_counter() - started)
    return 2 * source.numel() * source.element_size() / min(times) / 1e9


def measure(dtype: str, tokens: int, repeats: int) -> dict:
    """Runs in its own process: one format's stream speed, its limit, and its answers' likelihood."""
    from pfi_rag.config import ModelsConfig
    from pfi_rag.data.records import load_client_data
    from pfi_rag.data.synth import synthesize
    from pfi_rag.models import Engine, GenerationRequest
    from pfi_rag.models.loading import load_generator
    from pfi_rag.models.prompting import UsedPassage

    model, tokenizer, runtime = load_generator(ModelsConfig(dtype=dtype, threads=1))
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # tied weights once
    root = Path(tempfile.mkdtemp(prefix="pfi-one-stream-"))
    synthesize(root, clients=4, seed=0)
    engine = Engine(model, tokenizer, data_root=root)
    request = GenerationRequest("solo", "Tell me about my week.", passages=[], max_new_tokens=tokens)
    engine.generate(GenerationRequest("solo", "Hi", passages=[], max_new_tokens=2))  # warm-up
    rates, bandwidths = [], []
    for _ in range(repeats):
        bandwidths.append(bandwidth_gb_s())
        job = engine.prepare(request)
        batch = engine.new_batch()
        batch.add([job.row])  # prefill: not part of the stream's decode speed
        started = time.perf_counter()
        while len(batch):
            batch.step()
        rates.append((len(engine.finish(job).token_ids) - 1) / (time.perf_counter() - started))
    nll, answers = [], []
    for client in ("client-00", "client-01", "client-02", "client-03"):
        data = load_client_data(root, client)
        documents = {d.id: d for d in data.documents}
        for qa in data.qa[:5]:
            note = documents[qa.doc_id]
            ask = GenerationRequest(client, qa.question, passages=[UsedPassage(1, note.id, note.text, 1.0)])
            job = engine.prepare(ask)
            job.lease.release()
            answer_ids = tokenizer(" " + qa.answer, add_special_tokens=False)["input_ids"]
            ids = torch.tensor([job.prompt.input_ids + answer_ids])
            with torch.inference_mode():
                logits = engine.model(input_ids=ids).logits[0, -len(answer_ids) - 1 : -1].float()
            nll.append(torch.nn.functional.cross_entropy(logits, torch.tensor(answer_ids)).item())
            short = dataclasses.replace(ask, max_new_tokens=16)
            answers.append(engine.generate(short).token_ids)
    bandwidth = statistics.median(bandwidths)
    return {
        "dtype": str(runtime.dtype).removeprefix("torch."),
        "tok_s": statistics.median(rates),
        "weight_mb": weight_bytes / 1e6,
        "bandwidth_gb_s": bandwidth,
        "limit_tok_s": bandwidth * 1e9 / weight_bytes,
        "answer_nll": statistics.fmean(nll),
        "answers": answers,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.tokens, args.repeats)))
        return
    started = time.perf_counter()
    rows = []
    for dtype in FORMATS:
        command = [sys.executable, __file__, "--measure", dtype, "--tokens", str(args.tokens)]
        command += ["--repeats", str(args.repeats)]
        out = subprocess.run(command, capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    reference = rows[0]["answers"]
    print(f"one greedy stream, {args.tokens} new tokens, 1 thread, median of {args.repeats}:")
    for row in rows:
        same = sum(a == b for a, b in zip(row["answers"], reference, strict=True))
        row["answers_equal_fp32"] = same
        print(
            f"  {row['dtype']:<9} {row['tok_s']:5.1f} tok/s = {row['tok_s'] / row['limit_tok_s']:4.0%} of "
            f"the bandwidth limit {row['limit_tok_s']:5.1f} tok/s ({row['weight_mb']:.0f} MB of weights at "
            f"{row['bandwidth_gb_s']:.1f} GB/s copy bandwidth); held-out answer NLL {row['answer_nll']:.3f} "
            f"(fp32 {rows[0]['answer_nll']:.3f}); greedy answers equal to fp32's: {same}/{len(reference)}"
        )
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
