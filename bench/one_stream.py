"""One decode stream on CPU against its memory-bandwidth limit, per weight format and thread count.

    .venv/bin/python bench/one_stream.py [--tokens 32] [--repeats 5] [--formats ...] [--threads 1,2]
                                         [--json out.json]

One request decoding alone reads every weight once per token, so its speed is bounded by
read bandwidth / bytes of weights read per token. Every format is loaded in ONE process and
the repeats are interleaved (format A, B, C, ... then again), so a shared machine's load hits
them alike and the ratios hold:

- ``transformers``: the raw baseline, plain ``model.generate`` on the fp32 model (greedy, no
  serving engine), decode rate from the difference of an N-token and a 1-token generate;
- ``float32``, ``bfloat16``: the serving engine with ``models.dtype``, decode steps through
  transformers' forward (``serving.decode_step = "transformers"``), as every format but ``lean``;
- ``lean``: the engine's default, fp32 decode steps through the lean step on fused input-major
  weights (pfi_rag/models/lean_step.py); its Linear time is its own fused products;
- ``lean-compiled``: the lean step with ``serving.compile_decode = "on"``: one-row steps through
  products compiled into reductions over out-major weights (pfi_rag/models/lean_rows.py); its
  Linear time is those compiled products alone (in the step the norms and the MLP fuse in);
- ``transposed``, ``int8``, ``int8-dynamic``: the engine on fp32 weights stored input-major or
  quantized to int8 (``serving.weight_format``, pfi_rag/models/quantization.py); the LoRA path
  stays fp32.

The limit: beside each repeat, the read bandwidth of a sum over a 512 MiB fp32 tensor (a
read-only stream, like a decode step's weights) with the same number of threads as the stream;
the limit is the FASTEST of these reads (an upper bound for that thread count) over the bytes of
weights a token reads. The machine's best (all cores) is printed too.

Per format and thread count: decode tokens/s of one greedy request (prefill excluded), the limit
and the share of it reached, and where a step's time goes: the base model's Linear layers run
alone on one row (each layer's own kernel, in model order) against the rest of the step. Per
format, the quality cost: mean negative log-likelihood per token of the synthetic QA's held-out
answers given their prompt with the right note, and how many greedy answers match fp32's token
for token.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

FORMATS = [
    "transformers",
    "float32",
    "transposed",
    "lean",
    "lean-compiled",
    "bfloat16",
    "int8",
    "int8-dynamic",
]
DEFAULT_FORMATS = "transformers,float32,transposed,lean,bfloat16,int8"


def read_gb_s(threads: int, repeats: int = 5) -> float:
    """Fastest read bandwidth of ``threads`` threads summing a 512 MiB fp32 tensor (far beyond cache)."""
    from pfi_rag.models.loading import torch_threads

    data = torch.ones(128 * 2**20)
    times = []
    with torch_threads(threads):
        for _ in range(repeats):
            started = time.perf_counter()
            data.sum()
            times.append(time.perf_counter() - started)
    return data.numel() * data.element_size() / min(times) / 1e9


def linear_ms(model, repeats: int = 5) -> float:
    """ms for every base Linear layer of ``model`` (not LoRA's) on one row, in model order: the
    weights' share of a decode step, through the same kernels the step uses."""
    layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and "lora_" not in n]
    dtype = next(model.parameters()).dtype
    rows = {size: torch.randn(1, 1, size).to(dtype) for size in {m.in_features for m in layers}}
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for layer in layers:
                layer(rows[layer.in_features])
            best = min(best, time.perf_counter() - started)
    return best * 1000


def lean_linear_ms(lean, repeats: int = 5) -> float:
    """ms for the lean step's fused products of one row (qkv, o + residual, gate-up, down +
    residual per layer, then the output projection), in model order, through the kernels its
    one-row steps use (MKL on input-major weights, or the compiled reductions on out-major ones)."""
    dtype = lean.head.dtype
    mm, addmm = lean._products(1)
    h = torch.randn(1, lean.final_norm.weight.shape[0]).to(dtype)
    act = torch.randn(1, lean.intermediate).to(dtype)
    attn = torch.randn(1, lean.heads * lean.head_dim).to(dtype)
    best = float("inf")
    with torch.inference_mode():
        for _ in range(repeats):
            started = time.perf_counter()
            for layer in lean.layers:
                mm(h, layer.qkv)
                addmm(h, attn, layer.o)
                mm(h, layer.gate_up)
                addmm(h, act, layer.down)
            mm(h, lean.head)
            best = min(best, time.perf_counter() - started)
    return best * 1000


def build(fmt: str, root: Path):
    """(engine or None, model, tokenizer) for one format."""
    from pfi_rag.config import ModelsConfig, ServingConfig
    from pfi_rag.models import Engine
    from pfi_rag.models.loading import load_generator
    from pfi_rag.models.quantization import quantize_linear_layers

    dtype = "bfloat16" if fmt == "bfloat16" else "float32"
    model, tokenizer, _ = load_generator(ModelsConfig(dtype=dtype, threads=1))
    if fmt == "transformers":
        return None, model, tokenizer
    quantize_linear_layers(model, fmt if fmt.startswith("int8") or fmt == "transposed" else "none")
    lean = fmt in ("lean", "lean-compiled")
    compile_decode = "on" if fmt == "lean-compiled" else "off"
    serving = ServingConfig(decode_step="lean" if lean else "transformers", compile_decode=compile_decode)
    return Engine(model, tokenizer, data_root=root, serving=serving), model, tokenizer


def engine_rate(engine, tokens: int) -> float:
    from pfi_rag.models import GenerationRequest

    request = GenerationRequest("solo", "Tell me about my week.", passages=[], max_new_tokens=tokens)
    job = engine.prepare(request)
    batch = engine.new_batch()
    batch.add([job.row])  # prefill: not part of the stream's decode speed
    started = time.perf_counter()
    while len(batch):
        batch.step()
    return (len(engine.finish(job).token_ids) - 1) / (time.perf_counter() - started)


def transformers_rate(model, tokenizer, tokens: int) -> float:
    """Plain ``generate``: (N - 1) tokens over the time an N-token run takes beyond a 1-token one."""
    chat = [{"role": "user", "content": "Tell me about my week."}]
    ids = tokenizer.apply_chat_template(
        chat, add_generation_prompt=True, return_tensors="pt", return_dict=True
    )
    common = {"do_sample": False, "pad_token_id": tokenizer.pad_token_id}
    with torch.inference_mode():
        started = time.perf_counter()
        model.generate(**ids, max_new_tokens=1, **common)
        one = time.perf_counter() - started
        started = time.perf_counter()
        model.generate(**ids, max_new_tokens=tokens, min_new_tokens=tokens, **common)
        many = time.perf_counter() - started
    return (tokens - 1) / max(many - one, 1e-9)


def quality(engine, tokenizer, root: Path) -> tuple[float, list[list[int]]]:
    """Held-out answers' mean NLL per token given the right note, and 16-token greedy answers."""
    from pfi_rag.data.records import load_client_data
    from pfi_rag.models import GenerationRequest
    from pfi_rag.models.prompting import UsedPassage

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
            answers.append(engine.generate(dataclasses.replace(ask, max_new_tokens=16)).token_ids)
    return statistics.fmean(nll), answers


def step_gap(repeats: int, steps: int = 16) -> None:
    """Where the engine's time per step goes beyond the model's: fp32 ms per decode step of the plain
    model, of the same model wrapped by PEFT with gathered routing (slot 0), and of an engine step."""
    import copy

    from pfi_rag.config import ModelsConfig, ServingConfig
    from pfi_rag.data.synth import synthesize
    from pfi_rag.models import Engine, GenerationRequest
    from pfi_rag.models.loading import load_generator

    model, tokenizer, _ = load_generator(ModelsConfig(threads=1))
    plain = copy.deepcopy(model)
    root = Path(tempfile.mkdtemp(prefix="pfi-one-stream-"))
    synthesize(root, clients=1, seed=0)
    engine = Engine(model, tokenizer, data_root=root, serving=ServingConfig(decode_step="transformers"))
    question = "Tell me about my week please, in detail."
    ids = tokenizer(question, return_tensors="pt").input_ids

    def model_steps(m) -> float:
        with torch.inference_mode():
            out = m(input_ids=ids, use_cache=True)
            cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            started = time.perf_counter()
            for _ in range(steps):
                out = m(input_ids=token, past_key_values=cache, use_cache=True)
                cache, token = out.past_key_values, out.logits[:, -1].argmax(-1, keepdim=True)
            return (time.perf_counter() - started) / steps * 1000

    def wrapped_steps() -> float:
        with engine.gathered.rows([0]):
            return model_steps(engine.model)

    def engine_steps() -> float:
        job = engine.prepare(GenerationRequest("solo", question, passages=[], max_new_tokens=200))
        batch = engine.new_batch()
        batch.add([job.row])
        started, done = time.perf_counter(), 0
        while len(batch) and done < steps:
            batch.step()
            done += 1
        elapsed = (time.perf_counter() - started) / done * 1000
        batch.cancel(batch.rows)
        engine.finish(job)
        return elapsed

    kinds = {"plain model": lambda: model_steps(plain), "PEFT-wrapped + routing": wrapped_steps,
             "engine step": engine_steps}  # fmt: skip
    times: dict[str, list[float]] = {name: [] for name in kinds}
    for _ in range(repeats):
        for name, run in kinds.items():
            times[name].append(run())
    base = statistics.median(times["plain model"])
    print(f"fp32 ms per decode step, 1 thread, median of {repeats} interleaved repeats of {steps} steps:")
    for name, values in times.items():
        print(f"  {name:<24} {statistics.median(values):6.1f} ms = {statistics.median(values) / base:.2f}x")


def kernels(thread_counts: list[int], repeats: int = 7) -> None:
    """GB/s of weights read by each one-row product kernel on the output projection's shape
    (49,152 x 576, beyond cache), beside the read bandwidth of a sum: how close a kernel can come
    to the limit. ``compiled``: the product written as a reduction (``(w * x).sum(-1)``) and
    compiled by inductor into one loop that reads each weight once."""
    weight = torch.randn(49152, 576)
    codes, scales = torch.randint(-127, 128, weight.shape, dtype=torch.int8), torch.rand(49152)
    row = torch.randn(1, 576)
    input_major = weight.t().contiguous().t()
    reduce32 = torch.compile(lambda x, w: (w * x).sum(-1))
    reduce8 = torch.compile(lambda x, w, s: (w.to(torch.float32) * x).sum(-1) * s)
    cases = {
        "fp32 F.linear, (out, in) weight": (lambda: torch.nn.functional.linear(row, weight), 4),
        "fp32 F.linear, input-major weight": (lambda: torch.nn.functional.linear(row, input_major), 4),
        "int8 _weight_int8pack_mm, bf16 row": (
            lambda: torch._weight_int8pack_mm(row.bfloat16(), codes, scales.bfloat16()), 1),
        "fp32 compiled reduction": (lambda: reduce32(row, weight), 4),
        "int8 compiled reduction": (lambda: reduce8(row, codes, scales), 1),
    }  # fmt: skip
    with torch.inference_mode():
        for threads in thread_counts:
            torch.set_num_threads(threads)
            print(f"{threads} thread(s): read (sum of 512 MiB) {read_gb_s(threads):.1f} GB/s")
            for name, (run, size) in cases.items():
                run()  # compiles on first call
                best = float("inf")
                for _ in range(repeats):
                    started = time.perf_counter()
                    run()
                    best = min(best, time.perf_counter() - started)
                print(f"  {name:<36} {weight.numel() * size / best / 1e9:5.1f} GB/s")
    layout_by_rows(thread_counts[0])


def layout_by_rows(threads: int, repeats: int = 5) -> None:
    """ms for every Linear of a SmolLM2-135M-shaped model (random weights) on 1, 8 and 100 rows,
    with (out, in) and input-major weights: what the ``transposed`` format gains and costs."""
    torch.set_num_threads(threads)
    shapes = [(576, 576), (192, 576), (192, 576), (576, 576), (1536, 576), (1536, 576), (576, 1536)] * 30
    weights = [torch.randn(shape) for shape in [*shapes, (49152, 576)]]
    layouts = {"(out, in)": weights, "input-major": [w.t().contiguous().t() for w in weights]}
    print(f"every Linear of the model once, {threads} thread(s), fastest of {repeats}:")
    with torch.inference_mode():
        for rows in (1, 8, 100):
            inputs = {size: torch.randn(rows, size) for size in (576, 1536)}
            line = f"  {rows:>3} row(s):"
            for name, layers in layouts.items():
                best = float("inf")
                for _ in range(repeats):
                    started = time.perf_counter()
                    for w in layers:
                        torch.nn.functional.linear(inputs[w.shape[1]], w)
                    best = min(best, time.perf_counter() - started)
                line += f" {name} {best * 1000:6.1f} ms"
            print(line)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--formats", default=DEFAULT_FORMATS, help=f"comma-separated, of {FORMATS}")
    parser.add_argument("--threads", default="1,2", help="comma-separated thread counts for the stream")
    parser.add_argument("--json", type=Path)
    parser.add_argument(
        "--step-gap", action="store_true", help="only the engine's cost per step vs the model's"
    )
    parser.add_argument("--kernels", action="store_true", help="only each one-row kernel's read speed")
    args = parser.parse_args()
    if args.kernels:
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        kernels([int(t) for t in args.threads.split(",")])
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    if args.step_gap:
        print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        step_gap(args.repeats)
        print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
        return
    from pfi_rag.data.synth import synthesize
    from pfi_rag.models import GenerationRequest
    from pfi_rag.models.quantization import weight_bytes_read_per_token

    started = time.perf_counter()
    print(f"load average at start: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    root = Path(tempfile.mkdtemp(prefix="pfi-one-stream-"))
    synthesize(root, clients=4, seed=0)
    formats = args.formats.split(",")
    thread_counts = [int(t) for t in args.threads.split(",")]
    built = {fmt: build(fmt, root) for fmt in formats}
    for engine, _, _ in built.values():
        if engine is not None:
            engine.generate(GenerationRequest("solo", "Hi", passages=[], max_new_tokens=2))  # warm-up
    runs = [(fmt, threads) for threads in thread_counts for fmt in formats]
    rates: dict[tuple[str, int], list[float]] = {run: [] for run in runs}
    reads: dict[int, list[float]] = {threads: [] for threads in thread_counts}
    for repeat in range(args.repeats):
        for threads in thread_counts:
            reads[threads].append(read_gb_s(threads))
        order = runs[repeat % len(runs) :] + runs[: repeat % len(runs)]  # rotate who goes first
        for fmt, threads in order:
            engine, model, tokenizer = built[fmt]
            torch.set_num_threads(threads)
            if engine is None:
                rates[fmt, threads].append(transformers_rate(model, tokenizer, args.tokens))
            else:
                rates[fmt, threads].append(engine_rate(engine, args.tokens))
    machine = max(read_gb_s(os.cpu_count() or 1) for _ in range(args.repeats))
    quality_of = {}
    torch.set_num_threads(thread_counts[0])
    for fmt, (engine, _, tokenizer) in built.items():
        if engine is not None:
            quality_of[fmt] = quality(engine, tokenizer, root)
    rows = []
    for fmt, threads in runs:
        engine, model, tokenizer = built[fmt]
        base = model if engine is None else engine.model.get_base_model()
        weight_bytes = weight_bytes_read_per_token(base)
        torch.set_num_threads(threads)
        read = max(reads[threads])
        row = {
            "format": fmt,
            "threads": threads,
            "tok_s": statistics.median(rates[fmt, threads]),
            "tok_s_all": rates[fmt, threads],
            "weight_mb": weight_bytes / 1e6,
            "read_gb_s": read,
            "read_gb_s_all": reads[threads],
            "limit_tok_s": read * 1e9 / weight_bytes,
            "linear_ms": lean_linear_ms(engine.lean) if fmt.startswith("lean") else linear_ms(base),
        }
        row["share_of_limit"] = row["tok_s"] / row["limit_tok_s"]
        if fmt in quality_of:
            row["answer_nll"], row["answers"] = quality_of[fmt]
        rows.append(row)
    print(
        f"one greedy stream, {args.tokens} new tokens, median of {args.repeats} interleaved repeats; limit = "
        f"fastest read (sum of 512 MiB) with the stream's threads / bytes of weights per token"
    )
    for threads in thread_counts:
        print(f"  read bandwidth, {threads} thread(s): {max(reads[threads]):.1f} GB/s (fastest; "
              f"{min(reads[threads]):.1f}-{max(reads[threads]):.1f} over the repeats)")  # fmt: skip
    print(f"  machine's best read, all {os.cpu_count()} cores: {machine:.1f} GB/s")
    reference = {r["threads"]: r for r in rows if r["format"] == "float32"}
    fp32_answers = quality_of.get("float32")
    for row in rows:
        step = 1000 / row["tok_s"]
        line = (
            f"  {row['format']:<13} {row['threads']} thr {row['tok_s']:5.1f} tok/s = "
            f"{row['share_of_limit']:4.0%} of the limit {row['limit_tok_s']:6.1f} tok/s "
            f"({row['weight_mb']:.0f} MB/token at {row['read_gb_s']:.1f} GB/s); step {step:5.1f} ms = "
            f"Linear layers {row['linear_ms']:5.1f} ms ({row['weight_mb'] / row['linear_ms']:4.1f} GB/s)"
            f" + rest {step - row['linear_ms']:5.1f} ms"
        )
        if row["threads"] in reference and row["format"] != "transformers":
            line += f"; {row['tok_s'] / reference[row['threads']]['tok_s']:.2f}x fp32"
        print(line)
    if fp32_answers is not None:
        print("quality (1 thread): held-out answer NLL per token; 16-token greedy answers equal to fp32's")
        for fmt, (nll, answers) in quality_of.items():
            same = sum(a == b for a, b in zip(answers, fp32_answers[1], strict=True))
            print(f"  {fmt:<13} NLL {nll:.3f} (fp32 {fp32_answers[0]:.3f}); "
                  f"equal to fp32: {same}/{len(answers)}")  # fmt: skip
            for row in rows:
                if row["format"] == fmt:
                    row["answers_equal_fp32"] = same
    print(f"load average at end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
