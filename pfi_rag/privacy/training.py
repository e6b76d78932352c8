"""DP-SGD training of a client's LoRA adapter with Opacus, charged to the client's privacy ledger.

The guarantee: each Document or Instruction is one record; every step samples records with
Poisson rate q, clips each record's adapter gradient to ``max_grad_norm`` and adds Gaussian noise
of std ``noise_multiplier * max_grad_norm`` to the sum (Opacus DPOptimizer). The ledger's
accountant composes every such step the client ever took. Only the adapter is trainable, so the
base model's weights never see the data.

Order of work: plan the spend (noise, rate, steps) from the record *count* alone, check it
against the budget, and only then tokenize and train; a refused call touches no data and writes
nothing.

Evaluation: without a metrics release the loss before and after training is computed over every
record (what ``pfi-rag train`` shows). With ``release_metrics`` (a federated round) it is computed
over :func:`metric_sample` only, a fixed number of records, so its cost does not grow with the
record count and the round's released metrics are what it computes.
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.data_loader import DPDataLoader
from opacus.optimizers import DPOptimizerFastGradientClipping
from torch.utils.data import DataLoader

from pfi_rag.config import PrivacyConfig
from pfi_rag.data.records import Document, Instruction
from pfi_rag.privacy.accounting import epsilon_of, noise_for_spend, sample_rate
from pfi_rag.privacy.dataset import (
    IGNORE_INDEX,
    Collate,
    Example,
    batch_size_of,
    build_examples,
    sequence_losses,
)
from pfi_rag.privacy.errors import PrivacyError
from pfi_rag.privacy.ledger import PrivacyLedger, check_delta
from pfi_rag.privacy.round_metrics import noised_round_metrics, release_entry

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepInfo:
    """What a progress callback sees after each optimizer step."""

    step: int
    steps: int
    loss: float  # mean per-record loss of this step's batch (nan for an empty batch)
    epsilon: float  # the client's composed epsilon so far (inf when not private)


@dataclass(frozen=True)
class TrainResult:
    loss_before: float  # mean per-record loss over the evaluated records, before training
    loss_after: float
    epsilon: float  # what this call took from the budget (inf when not private)
    epsilon_total: float  # the client's composed epsilon after this call
    delta: float | None
    noise_multiplier: float | None  # None: non-private (no clipping, no noise)
    max_grad_norm: float | None
    sample_rate: float
    steps: int
    empty_steps: int  # Poisson batches with no record: a noise-only step, still accounted
    tokens: int  # tokens in the batches trained on
    records: int
    accountant: str
    grad_sample_mode: str | None
    seconds: float
    # Records each loss evaluation ran the model on (before, and again after, training): every
    # record, or with release_metrics always privacy.round_metrics_sample, whatever the count.
    evaluated: int = 0
    # Wall seconds per phase (plan, tokenize, evaluate, dp_setup, dp_steps, commit); local only.
    phases: dict[str, float] = field(default_factory=dict)
    # The round's metrics as released (round_metrics.noised_round_metrics), when asked for;
    # epsilon and epsilon_total include their cost.
    released_metrics: dict[str, float] | None = None

    @property
    def private(self) -> bool:
        return self.noise_multiplier is not None and self.noise_multiplier > 0

    def to_json(self) -> dict:
        return asdict(self) | {"private": self.private}


def train_adapter(
    model,
    tokenizer,
    *,
    documents: Sequence[Document],
    instructions: Sequence[Instruction],
    cfg: PrivacyConfig,
    ledger: PrivacyLedger | None,
    seed: int | None = None,
    epsilon: float | None = None,
    noise_multiplier: float | None = None,
    steps: int | None = None,
    progress: Callable[[StepInfo], None] | None = None,
    private: bool = True,
    after_step: Callable[[], None] | None = None,
    release_metrics: bool = False,
    evaluate: bool = True,
) -> TrainResult:
    """Train ``model``'s active LoRA adapter in place with DP-SGD and charge ``ledger``.

    The spend is ``epsilon`` (what this call may take from the budget; the noise is solved for
    it) or ``noise_multiplier``; neither: ``cfg.noise_multiplier``, else ``cfg.epsilon_per_round``.
    ``private=False`` trains without clipping or noise (a baseline; refused with a ledger).
    ``after_step()`` runs after every optimizer step; it may change the weights only in ways that
    do not read the data (e.g. Ditto's proximal pull), which keeps the result private.
    ``seed`` fixes Poisson sampling and noise: for tests and experiments only, since whoever knows
    it can regenerate the noise and subtract it. None (every real client) draws it from the OS.
    ``release_metrics`` also releases the round's record count and losses, noised
    (:mod:`pfi_rag.privacy.round_metrics`), inside the same spend.
    ``evaluate=False`` skips the loss evaluation before and after training (``loss_before`` and
    ``loss_after`` are nan) for a caller that does not read them; a release still evaluates.
    Raises :class:`BudgetExceeded` before reading any record if the spend would pass the budget.
    On return the model is a plain PeftModel again (Opacus hooks removed) in eval mode.
    """
    if epsilon is not None and noise_multiplier is not None:
        raise PrivacyError("give an epsilon to spend or a noise multiplier, not both")
    records = len(documents) + len(instructions)
    if records == 0:
        raise PrivacyError("no documents or instructions to train on")
    steps = steps or cfg.local_steps
    rate = sample_rate(records, cfg.batch_size)
    phases: dict[str, float] = {}
    if seed is None:
        seed = secrets.randbits(62)
    release = [release_entry(cfg.round_metrics_noise)] if release_metrics else []
    train = functools.partial(
        _train,
        model,
        tokenizer,
        documents,
        instructions,
        cfg,
        rate=rate,
        steps=steps,
        seed=seed,
        progress=progress,
        after_step=after_step,
        phases=phases,
        evaluate=evaluate,
    )
    if not private:
        if ledger is not None:
            raise PrivacyError("a non-private run cannot be charged to a ledger: pass ledger=None")
        if release_metrics:
            raise PrivacyError("a non-private run has no private metrics to release")
        return train(ledger=None, plan=None)

    planning = time.perf_counter()
    history = ledger.history if ledger is not None else []
    delta = ledger.delta_for(records) if ledger is not None else check_delta(cfg.delta, records)
    if noise_multiplier is None and epsilon is None:
        noise_multiplier = cfg.noise_multiplier
        epsilon = cfg.epsilon_per_round if noise_multiplier is None else None
    if noise_multiplier is None:
        if ledger is not None:
            ledger.check_remaining(epsilon)  # refuse before the (slower) noise search
        noise_multiplier = noise_for_spend(
            history,
            epsilon=epsilon,
            sample_rate=rate,
            steps=steps,
            delta=delta,
            mechanism=ledger.mechanism if ledger is not None else cfg.accountant,
            also=release,
        )
    plan = {
        "noise_multiplier": noise_multiplier,
        "sample_rate": rate,
        "steps": steps,
        "records": records,
        "also": release,
    }
    phases["plan"] = time.perf_counter() - planning
    if ledger is None:
        return train(ledger=None, plan=plan)
    ledger.check(**plan)
    with ledger.locked():  # re-reads the ledger: another process may have spent meanwhile
        ledger.check(**plan)
        return train(ledger=ledger, plan=plan)


def _train(
    model,
    tokenizer,
    documents: Sequence[Document],
    instructions: Sequence[Instruction],
    cfg: PrivacyConfig,
    *,
    ledger: PrivacyLedger | None,
    plan: dict | None,  # None: non-private; else the checked spend (train_adapter)
    rate: float,
    steps: int,
    seed: int,
    progress: Callable[[StepInfo], None] | None,
    after_step: Callable[[], None] | None,
    phases: dict[str, float],
    evaluate: bool,
) -> TrainResult:
    """The training loop: data, evaluation, DP wrapping, steps, cleanup, ledger commit, evaluation."""
    started = clock = time.perf_counter()

    def lap(phase: str) -> None:
        nonlocal clock
        now = time.perf_counter()
        phases[phase] = phases.get(phase, 0.0) + now - clock
        clock = now

    device = next(model.parameters()).device
    cfg = cfg.model_copy(update={"grad_sample_mode": grad_sample_mode_for(cfg.grad_sample_mode, device)})
    examples = build_examples(tokenizer, documents, instructions, max_len=cfg.max_seq_len, seed=seed)
    collate = Collate(tokenizer.pad_token_id)
    releasing = plan is not None and bool(plan["also"])
    if releasing:  # a fixed-size sample: the round's released metrics need no more
        evaluated, counted = metric_sample(
            examples, cfg.round_metrics_sample, np.random.default_rng([seed, 3])
        )
    else:
        evaluated = list(examples) if evaluate else []
        counted = len(evaluated)
    lap("tokenize")
    losses_before = record_losses(model, evaluated, collate, cfg.batch_size)[:counted]
    lap("evaluate")

    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise PrivacyError("the model has no trainable parameters: attach a LoRA adapter first")
    optimizer_cls = torch.optim.Adam if cfg.optimizer == "adam" else torch.optim.SGD
    optimizer = optimizer_cls(params, lr=cfg.learning_rate)
    sampler_rng = torch.Generator().manual_seed(seed)
    loader = DataLoader(examples, batch_size=cfg.batch_size, collate_fn=collate, generator=sampler_rng)
    mechanism = ledger.mechanism if ledger is not None else cfg.accountant
    delta = None
    hooks = criterion = engine = None
    model.train()  # Opacus refuses a module in eval mode
    if plan is None:  # non-private baseline: plain shuffled batches of the same expected size
        loader = DataLoader(
            examples, batch_size=cfg.batch_size, collate_fn=collate, shuffle=True, generator=sampler_rng
        )
    else:
        delta = ledger.delta_for(len(examples)) if ledger else check_delta(cfg.delta, len(examples))
        engine, hooks, optimizer, criterion, loader = _make_private(
            model, optimizer, loader, cfg, ledger, plan, mechanism, seed, device
        )
        if not math.isclose(1 / len(loader), rate):
            raise PrivacyError(f"Opacus sampled at {1 / len(loader)} but the spend was planned at {rate}")
    lap("dp_setup")

    step, empty_steps, tokens = 0, 0, 0
    with warnings.catch_warnings():
        # The frozen base's inputs need no gradient, so torch warns about Opacus's backward hooks.
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        try:
            while step < steps:
                for batch in loader:
                    if batch_size_of(batch) == 0:
                        _noise_only_step(optimizer)  # Poisson drew no record: noise still goes out
                        empty_steps += 1
                        loss = math.nan
                    else:
                        batch = {key: value.to(device) for key, value in batch.items()}
                        loss = _train_step(model, optimizer, criterion, batch)
                        tokens += int(batch["attention_mask"].sum())
                    step += 1
                    if after_step is not None:
                        after_step()
                    if progress is not None:
                        spent = (
                            epsilon_of(engine.accountant.history, delta=delta, mechanism=mechanism)
                            if engine
                            else math.inf
                        )
                        progress(StepInfo(step=step, steps=steps, loss=loss, epsilon=spent))
                    if step >= steps:
                        break
        finally:
            if hooks is not None:
                hooks.cleanup()  # removes Opacus's hooks and per-sample attributes from the model
            for p in params:
                p.grad = None
            model.eval()
            lap("dp_steps")
            before = ledger.epsilon_spent if ledger is not None else 0.0
            if ledger is not None and step > 0:
                # Recorded even if training failed midway: the weights already moved.
                committed = ledger.commit(
                    engine.accountant.state_dict(), records=len(examples), max_grad_norm=cfg.max_grad_norm
                )

    lap("commit")
    losses_after = record_losses(model, evaluated, collate, cfg.batch_size)[:counted]
    lap("evaluate")
    released = None
    if releasing:
        released = noised_round_metrics(
            losses_before,
            losses_after,
            records=len(examples),
            sample=cfg.round_metrics_sample,
            clip=cfg.round_metrics_loss_clip,
            noise_multiplier=cfg.round_metrics_noise,
            rng=np.random.default_rng([seed, 2]),
        )
        if ledger is not None:
            committed = ledger.commit_release(plan["also"][0], records=len(examples))
        lap("commit")
    if engine is None:
        total = spent = math.inf
    elif ledger is not None:
        total, spent = committed.epsilon_after, committed.epsilon_after - before
    else:
        history = [*engine.accountant.history, *plan["also"]]
        total = spent = epsilon_of(history, delta=delta, mechanism=mechanism)
    return TrainResult(
        loss_before=sum(losses_before) / len(losses_before) if losses_before else math.nan,
        loss_after=sum(losses_after) / len(losses_after) if losses_after else math.nan,
        epsilon=spent,
        epsilon_total=total,
        delta=delta,
        noise_multiplier=plan["noise_multiplier"] if plan else None,
        max_grad_norm=cfg.max_grad_norm if plan else None,
        sample_rate=rate,
        steps=step,
        empty_steps=empty_steps,
        tokens=tokens,
        records=len(examples),
        accountant=mechanism,
        grad_sample_mode=cfg.grad_sample_mode if plan else None,
        seconds=time.perf_counter() - started,
        evaluated=len(evaluated),
        phases=phases,
        released_metrics=released,
    )


def grad_sample_mode_for(mode: str, device: torch.device) -> str:
    """The Opacus grad_sample_mode to use: ``mode`` itself, or for "auto" the fastest measured
    on the default model on this kind of device (config.PrivacyConfig.grad_sample_mode)."""
    if mode != "auto":
        return mode
    return "ghost" if device.type == "cuda" else "hooks"


def _make_private(model, optimizer, loader, cfg, ledger, plan, mechanism, seed, device):
    """A fresh PrivacyEngine per call (no Opacus state outlives it), its accountant loaded from
    the ledger so the DP optimizer's step hook extends the client's history. Opacus's RDP
    accountant only keeps that history here; the ledger's accountant (``mechanism``) computes
    every epsilon from it."""
    with warnings.catch_warnings():
        # secure_mode needs torchcsprng; the pseudo-RNG warning is known and documented.
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        engine = PrivacyEngine(accountant="rdp")
    if ledger is not None and ledger.history:
        engine.accountant.load_state_dict({"history": ledger.history, "mechanism": "rdp"})
    # Poisson sampling, built here rather than by make_private so its generator is seeded:
    # each record joins each batch independently with rate q (what the accountant assumes).
    poisson = DPDataLoader.from_data_loader(loader, generator=loader.generator)
    noise_rng = torch.Generator(device=device).manual_seed(seed + 1)
    wrapped = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=poisson,
        criterion=torch.nn.CrossEntropyLoss(ignore_index=IGNORE_INDEX),
        noise_multiplier=plan["noise_multiplier"],
        max_grad_norm=cfg.max_grad_norm,
        poisson_sampling=False,  # already a Poisson loader (above)
        grad_sample_mode=cfg.grad_sample_mode,
        # Hooks on the PeftModel itself rather than a wrapper module: the caller keeps a plain
        # PeftModel, and cleanup() removes every hook (Opacus issue #820: hook changes broke LoRA).
        wrap_model=False,
        noise_generator=noise_rng,
    )
    if cfg.grad_sample_mode == "ghost":
        hooks, dp_optimizer, criterion, dp_loader = wrapped
    else:
        (hooks, dp_optimizer, dp_loader), criterion = wrapped, None
    return engine, hooks, dp_optimizer, criterion, dp_loader


def _train_step(model, optimizer, criterion, batch: dict[str, torch.Tensor]) -> float:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    if criterion is not None:
        # Ghost clipping: the loss must go through Opacus's criterion, which needs the (B, T)
        # shape to turn token losses into one loss per record (mean over its target tokens).
        shifted = logits[:, :-1].float()  # (B, T-1, V)
        targets = batch["labels"][:, 1:]  # (B, T-1)
        loss = criterion(
            shifted.reshape(-1, shifted.shape[-1]),
            targets.reshape(-1),
            shape=(shifted.shape[0], shifted.shape[1]),
        )
    else:
        loss = sequence_losses(logits, batch["labels"]).mean()  # one loss per record, averaged
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


def _noise_only_step(optimizer) -> None:
    """Take the step of an empty Poisson batch: a zero clipped sum plus noise, accounted as usual.

    Skipping it would reveal that no record was sampled, an event the accountant does not cover;
    HF models cannot run a 0-row batch, so the zero per-record gradients are set directly.
    """
    for p in optimizer.params:
        if isinstance(optimizer, DPOptimizerFastGradientClipping):
            p.grad = torch.zeros_like(p)  # ghost clipping reads the clipped sum from p.grad
        else:
            p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype, device=p.device)  # (0, *shape)
    optimizer.step()
    optimizer.zero_grad()


def metric_sample(
    examples: Sequence[Example], size: int, rng: np.random.Generator
) -> tuple[list[Example], int]:
    """The round metrics' evaluation set: always ``size`` examples, and how many of them count.

    ``min(size, n)`` records drawn without replacement (their evaluation windows) count; a client
    with fewer than ``size`` records repeats them to fill ``size``, and the repeats' losses are
    dropped. So the evaluation's cost, and with it when the client replies, does not depend on
    its record count n (round_metrics explains why the release's accounting stays the same).
    """
    windows = list(examples)  # each record's evaluation window
    counted = min(size, len(windows))
    picked = [windows[i] for i in rng.choice(len(windows), size=counted, replace=False)]
    return picked + [picked[i % counted] for i in range(size - counted)], counted


@torch.no_grad()
def record_losses(model, examples: Sequence[Example], collate: Collate, batch_size: int) -> list[float]:
    """Each record's loss (the training objective: mean NLL of its target tokens), in eval mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    losses: list[float] = []
    for start in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(list(examples[start : start + batch_size])).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        losses.extend(sequence_losses(logits, batch["labels"]).tolist())
    model.train(was_training)
    return losses
