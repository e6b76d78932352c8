"""DP-SGD cost and utility on the default model (SmolLM2-135M): `python bench/dp_train.py`.

Prints, in one run:
- step time of DP training per grad_sample_mode over non-private training (target <= 1.3x for
  the default mode), peak memory ratio (target <= 1.5x), tokens/s;
- utility: held-out perplexity of one synthetic client after training at epsilon 1, 4, 8 and
  without privacy, against the base model, once per accountant (PLD, the default, and RDP): at
  equal epsilon the tighter PLD accounting needs less noise (``--skip-timing`` runs only this).

Step times are medians over interleaved rounds (the machine is shared and noisy). Memory is the
peak resident set (cpu, reset per run through /proc/self/clear_refs) or peak allocated (cuda),
both as total and as growth over the loaded model.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

from pfi_rag.config import AdapterConfig, ModelsConfig, PrivacyConfig
from pfi_rag.data.records import load_client_data
from pfi_rag.data.synth import synthesize
from pfi_rag.models.loading import load_generator
from pfi_rag.models.lora import attach_lora
from pfi_rag.models.scoring import continuation_nll, perplexity
from pfi_rag.privacy import train_adapter

MODES = ["hooks", "functorch", "ghost"]


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    else:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS


def _memory(device: torch.device, peak: bool) -> float:
    """MiB: peak (or current) allocated on cuda, resident set size on cpu."""
    if device.type == "cuda":
        return (torch.cuda.max_memory_allocated() if peak else torch.cuda.memory_allocated()) / 2**20
    key = "VmHWM" if peak else "VmRSS"
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed_run(base, tokenizer, data, cfg: PrivacyConfig, *, mode: str | None, steps: int, seed: int) -> dict:
    """Step times of one short run on a subset (2 batches' worth: train_adapter's own loss
    evaluation before and after stays small next to the steps timed)."""
    model = attach_lora(copy.deepcopy(base), AdapterConfig(), seed=seed)
    documents = data["train_docs"][: 2 * cfg.batch_size]
    device = next(model.parameters()).device
    stamps: list[float] = []
    _reset_peak(device)
    resident = _memory(device, peak=False)
    started = time.perf_counter()
    result = train_adapter(
        model,
        tokenizer,
        documents=documents,
        instructions=[],
        cfg=cfg.model_copy(update={"grad_sample_mode": mode or "hooks"}),
        ledger=None,
        seed=seed,
        noise_multiplier=1.0,
        steps=steps,
        progress=lambda info: stamps.append(time.perf_counter()),
        private=mode is not None,
    )
    peak = _memory(device, peak=True)
    # Step i's time is from the end of step i-1; the first step (warm-up, first hook) is dropped.
    step_times = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    train_seconds = stamps[-1] - stamps[0] if len(stamps) > 1 else stamps[-1] - started
    tokens_per_step = result.tokens / max(result.steps, 1)
    return {
        "step_times": step_times,
        "peak_mib": peak,
        "growth_mib": peak - resident,
        "tokens_per_s": tokens_per_step * (len(stamps) - 1) / train_seconds
        if len(stamps) > 1
        else float("nan"),
    }


def utility(
    base, tokenizer, data, cfg: PrivacyConfig, *, epsilon: float | None, steps: int, seed: int
) -> dict:
    """One client's training at ``epsilon`` (None: non-private) with ``cfg.accountant``."""
    model = attach_lora(copy.deepcopy(base), AdapterConfig(), seed=seed)
    result = train_adapter(
        model,
        tokenizer,
        documents=data["train_docs"],
        instructions=data["instructions"],
        cfg=cfg,
        ledger=None,
        seed=seed,
        epsilon=epsilon,
        steps=steps,
        private=epsilon is not None,
    )
    return {
        "epsilon": epsilon,
        "accountant": cfg.accountant if epsilon is not None else "-",
        "noise_multiplier": result.noise_multiplier,
        "train_loss": [round(result.loss_before, 4), round(result.loss_after, 4)],
        **evaluate(model, tokenizer, data),
    }


def evaluate(model, tokenizer, data) -> dict:
    qa = continuation_nll(
        model, tokenizer, [q.question for q in data["qa"]], [" " + q.answer for q in data["qa"]]
    )
    qa_nll = sum(nll for nll, _ in qa) / sum(n for _, n in qa)
    return {
        "heldout_doc_ppl": round(perplexity(model, tokenizer, [d.text for d in data["heldout_docs"]]), 3),
        "qa_answer_ppl": round(float(torch.exp(torch.tensor(qa_nll))), 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--generator", default="smollm2", help="models.generator (default: the default model)"
    )
    parser.add_argument("--rounds", type=int, default=2, help="interleaved timing rounds per mode")
    parser.add_argument("--timing-steps", type=int, default=4, help="steps per timing run (first dropped)")
    parser.add_argument("--utility-steps", type=int, default=12, help="steps per utility run")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seq-len", type=int, default=64)
    parser.add_argument("--client", default="client-00")
    parser.add_argument("--json", action="store_true", help="print the results as JSON only")
    parser.add_argument("--skip-timing", action="store_true", help="only the utility per accountant")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes

    started = time.perf_counter()
    base, tokenizer, runtime = load_generator(ModelsConfig(generator=args.generator))
    with tempfile.TemporaryDirectory() as root:
        synthesize(Path(root), clients=1, seed=0)
        client = load_client_data(Path(root), args.client)
    cut = max(1, len(client.documents) // 5)  # hold out a fifth of the documents (same persona)
    data = {
        "train_docs": client.documents[cut:],
        "heldout_docs": client.documents[:cut],
        "instructions": client.instructions,
        "qa": client.qa,
    }
    cfg = PrivacyConfig(batch_size=args.batch_size, max_seq_len=args.max_seq_len, learning_rate=5e-3)

    runs: dict[str, list[dict]] = {name: [] for name in ["non-private", *MODES]}
    for round_ in range(0 if args.skip_timing else args.rounds):
        for name in runs:
            mode = None if name == "non-private" else name
            runs[name].append(
                timed_run(base, tokenizer, data, cfg, mode=mode, steps=args.timing_steps, seed=round_)
            )
            if not args.json:  # progress on stderr: a full run takes minutes on 2 cores
                print(f"timed {name} round {round_}: {runs[name][-1]['step_times']}", file=sys.stderr)
    timing = {}
    for name, results in runs.items():
        if not results:
            continue
        timing[name] = {
            "step_s": statistics.median(t for r in results for t in r["step_times"]),
            "peak_mib": statistics.median(r["peak_mib"] for r in results),
            "growth_mib": statistics.median(r["growth_mib"] for r in results),
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in results),
        }
    plain = timing.get("non-private")
    for name in MODES if plain else []:
        timing[name]["time_ratio"] = timing[name]["step_s"] / plain["step_s"]
        timing[name]["peak_ratio"] = timing[name]["peak_mib"] / plain["peak_mib"]
        timing[name]["growth_ratio"] = timing[name]["growth_mib"] / max(plain["growth_mib"], 1e-9)

    quality = [{"epsilon": "base", **evaluate(base, tokenizer, data)}]
    for epsilon in [1.0, 4.0, 8.0, None]:
        for accountant in ("pld", "rdp") if epsilon is not None else ("pld",):
            run_cfg = cfg.model_copy(update={"accountant": accountant})
            quality.append(
                utility(base, tokenizer, data, run_cfg, epsilon=epsilon, steps=args.utility_steps, seed=0)
            )
            print(f"utility {quality[-1]}", file=sys.stderr)

    report = {
        "device": str(runtime.device),
        "threads": torch.get_num_threads(),
        "records": len(data["train_docs"]) + len(data["instructions"]),
        "settings": vars(args) | {"learning_rate": cfg.learning_rate, "max_grad_norm": cfg.max_grad_norm},
        "timing": timing,
        "utility": quality,
        "seconds": round(time.perf_counter() - started, 1),
    }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
        return
    print(f"device {report['device']}, {report['threads']} threads, {report['records']} training records")
    print(
        f"{'mode':<12}{'step s':>9}{'x plain':>9}{'peak MiB':>10}{'x plain':>9}{'growth MiB':>12}{'tok/s':>9}"
    )
    for name, t in timing.items():
        print(
            f"{name:<12}{t['step_s']:>9.3f}{t.get('time_ratio', 1.0):>9.2f}{t['peak_mib']:>10.0f}"
            f"{t.get('peak_ratio', 1.0):>9.2f}{t['growth_mib']:>12.0f}{t['tokens_per_s']:>9.1f}"
        )
    print(f"{'epsilon':<10}{'acct':>5}{'sigma':>8}{'held-out doc ppl':>18}{'QA answer ppl':>15}")
    for row in quality:
        sigma = row.get("noise_multiplier")
        label = "inf" if row["epsilon"] is None else str(row["epsilon"])
        print(
            f"{label:<10}{row.get('accountant', '-'):>5}{'-' if sigma is None else f'{sigma:.3f}':>8}"
            f"{row['heldout_doc_ppl']:>18.2f}{row['qa_answer_ppl']:>15.2f}"
        )
    print(f"total {report['seconds']} s; settings {json.dumps(report['settings'])}")


if __name__ == "__main__":
    main()
