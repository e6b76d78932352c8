"""One short check of the product on a GPU, in one command: `python bench/gpu_smoke.py`.

1. The default generator (SmolLM2-135M-Instruct) loads on cuda through pfi-rag's loader.
2. DP-SGD steps (Opacus) on its LoRA adapter for each grad_sample_mode ("auto" picks one per
   device), against non-private steps on the same data: step times, their ratio, the adapter moved.
3. Batched generation for 8 clients, each with its own adapter, against the same 8 requests one
   at a time: tokens/s of each, and whether the greedy tokens are identical; then prefill and
   decode timed apart for gathered LoRA and PEFT's mixed-adapter path (target: batched decode at
   least 4x one at a time on one GPU), and a batch of 8 adapters vs 8 rows on one adapter.
4. The same with the decode step under torch.compile (``serving.compile_decode``, on by default
   on CUDA): time of the first compiled batch (compiling), decode speed-ups against the eager
   engine, and whether its greedy tokens equal the eager ones.

Runs on cpu too, which is how it is checked without a GPU; a quick dry run:

    .venv/bin/python bench/gpu_smoke.py --device cpu --steps 2 --repeats 1 --tokens 8 --modes hooks

(step 4 is skipped on cpu unless ``--compile``: inductor's CPU compile takes minutes.)
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from generate import (  # bench/generate.py, beside this file
    batch_shapes,
    concurrent_clients,
    make_adapters,
    run_batch,
)

from pfi_rag.config import AdapterConfig, ModelsConfig, PrivacyConfig, ServingConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.models import Engine, GenerationRequest
from pfi_rag.models.loading import load_generator
from pfi_rag.models.lora import attach_lora, lora_arrays
from pfi_rag.privacy import train_adapter
from pfi_rag.privacy.training import grad_sample_mode_for

CLIENTS = 8


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def train_steps(base, tokenizer, documents, *, mode: str | None, steps: int, device) -> dict:
    """Step times of ``steps`` steps (the first is a warm-up and dropped) and how far the adapter moved."""
    model = attach_lora(copy.deepcopy(base), AdapterConfig(), seed=0)
    before = lora_arrays(model)
    stamps: list[float] = []

    def stamp(info) -> None:
        sync(device)
        stamps.append(time.perf_counter())

    cfg = PrivacyConfig(batch_size=8, max_seq_len=64, grad_sample_mode=mode or "hooks")
    result = train_adapter(
        model,
        tokenizer,
        documents=documents,
        instructions=[],
        cfg=cfg,
        ledger=None,
        seed=0,
        noise_multiplier=1.0 if mode else None,
        steps=steps,
        progress=stamp,
        private=mode is not None,
    )
    after = lora_arrays(model)
    moved = sum(float(((after[k] - before[k]) ** 2).sum()) for k in after) ** 0.5
    times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return {
        "step_s": statistics.median(times),
        "tokens_per_s": result.tokens / max(result.steps, 1) / statistics.median(times),
        "adapter_moved": moved,
        "grad_sample_mode": result.grad_sample_mode,
    }


def compiled_decode(eager: Engine, base, tokenizer, root: Path, requests, repeats: int) -> dict:
    """Step 4: the decode step under torch.compile against the eager engine, same requests."""
    serving = ServingConfig(compile_decode="on")
    compiled = Engine(base, tokenizer, data_root=root, serving=serving, adapter=AdapterConfig())
    started = time.perf_counter()
    first = run_batch(compiled, requests)  # compiles (one graph, dynamic shapes)
    for request in requests[:2]:
        run_batch(compiled, [request])  # batch of one: a recompile at most
    compile_s = time.perf_counter() - started
    same = first["token_ids"] == run_batch(eager, requests)["token_ids"]
    shapes = batch_shapes({"eager": eager, "compiled": compiled}, requests, repeats)
    row = shapes["compiled"]
    speed = row["batch"]["decode_tok_s"] / shapes["eager"]["batch"]["decode_tok_s"]
    alone = row["alone"]["decode_tok_s"] / shapes["eager"]["alone"]["decode_tok_s"]
    failed = compiled.compiled.failed
    print(
        f"4. compiled decode ({compile_s:.0f} s to compile and warm up; "
        f"{'FELL BACK TO EAGER: ' + failed if failed else f'{compiled.compiled.calls} compiled steps'}): "
        f"batch of 8 adapters {row['batch']['decode_tok_s']:.1f} tok/s = {speed:.2f}x eager, one at a time "
        f"{row['alone']['decode_tok_s']:.1f} tok/s = {alone:.2f}x eager; batched / one at a time "
        f"{row['decode_speedup']:.2f}x (target >= 4x); greedy tokens equal to eager: {same}"
    )
    return {"compile_s": compile_s, "failed": failed, "equal_to_eager": same, "shapes": shapes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--generator", default="smollm2")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--steps", type=int, default=4, help="training steps per mode (first dropped)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--modes", default="hooks,functorch,ghost", help="DP grad_sample_modes to time")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="time the compiled decode step (default: on cuda only)")  # fmt: skip
    args = parser.parse_args()

    started = time.perf_counter()
    cfg = ModelsConfig(generator=args.generator, device=args.device)
    base, tokenizer, runtime = load_generator(cfg)
    device = runtime.device
    loaded = time.perf_counter() - started
    gpu = torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu"
    print(
        f"1. {args.generator} on {device} ({gpu}), {runtime.dtype}, "
        f"attn={runtime.attn_implementation}: {loaded:.1f} s"
    )

    root = Path(tempfile.mkdtemp(prefix="pfi-gpu-smoke-"))
    synthesize(root, clients=CLIENTS, seed=0)
    documents = load_client_data(root, "client-00").documents
    plain = train_steps(base, tokenizer, documents, mode=None, steps=args.steps, device=device)
    default_mode = grad_sample_mode_for(PrivacyConfig().grad_sample_mode, device)
    private = {}
    for mode in args.modes.split(","):
        run = train_steps(base, tokenizer, documents, mode=mode, steps=args.steps, device=device)
        private[mode] = run
        print(
            f"2. DP-SGD step ({mode}{', auto here' if mode == default_mode else ''}, batch 8 x 64 tokens): "
            f"{run['step_s'] * 1000:.0f} ms vs non-private {plain['step_s'] * 1000:.0f} ms = "
            f"{run['step_s'] / plain['step_s']:.2f}x; {run['tokens_per_s']:.0f} training tok/s; "
            f"adapter moved by {run['adapter_moved']:.3g}"
        )

    clients = [f"client-{i:02d}" for i in range(CLIENTS)]
    make_adapters(base, root, clients)
    peft_base = copy.deepcopy(base)
    wants = args.compile or (args.compile is None and device.type == "cuda")
    compile_base = copy.deepcopy(base) if wants else None
    eager = ServingConfig(compile_decode="off")
    engine = Engine(base, tokenizer, data_root=root, serving=eager, adapter=AdapterConfig())
    requests = [
        GenerationRequest(c, load_client_data(root, c).qa[0].question, max_new_tokens=args.tokens, stop=[])
        for c in clients
    ]
    batched = concurrent_clients(engine, requests, args.repeats)
    print(
        f"3. {CLIENTS} clients x {CLIENTS} adapters, {args.tokens} tokens each: batched "
        f"{batched['batched_tok_s']:.1f} tok/s vs one at a time {batched['one_at_a_time_tok_s']:.1f} tok/s "
        f"= {batched['speedup']:.2f}x; greedy tokens identical: {batched['batched_equals_alone']}"
    )
    serving = ServingConfig(gathered_lora=False)
    peft = Engine(peft_base, tokenizer, data_root=root, serving=serving, adapter=AdapterConfig())
    shapes = batch_shapes({"gathered": engine, "peft": peft}, requests, args.repeats)
    for name, row in shapes.items():
        batch, alone, one = row["batch"], row["alone"], row["one_adapter_batch"]
        print(
            f"3. {name:<8} decode: batch of 8 adapters {batch['decode_tok_s']:.1f} tok/s vs one at a time "
            f"{alone['decode_tok_s']:.1f} = {row['decode_speedup']:.2f}x (target >= 4x); 8 rows on one "
            f"adapter {one['decode_tok_s']:.1f}, mixed/one {row['mixed_vs_one_adapter']:.2f}x; prefill "
            f"batch/alone {row['prefill_speedup']:.2f}x; greedy identical: {row['batched_equals_alone']}"
        )
    batched["shapes"] = shapes
    if compile_base is not None:
        batched["compiled"] = compiled_decode(engine, compile_base, tokenizer, root, requests, args.repeats)
    report = {"device": gpu, "load_s": loaded, "train": {"plain": plain, **private}, "generate": batched}
    print(json.dumps(report, default=str))
    print(f"total {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
