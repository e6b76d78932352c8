"""Likelihood scores of text under a causal LM: what utility, calibration and leakage probes read.

All functions take an already-loaded model (base, or a PeftModel with the wanted adapter
active) and score in batches without gradients.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import torch


def token_nll(logits: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100) -> torch.Tensor:
    """Next-token NLL (nats) at each position whose label is not ``ignore_index``, 0 elsewhere: (B, T-1).

    Only the target positions are scored, as one contiguous (N, V) slice: cross_entropy over the
    transposed (B, V, T-1) logits took 0.66 s a batch here for the 49k-token vocabulary, most of
    a tiny model's scoring and training time; the slice gives the same numbers.
    """
    logits = logits[:, :-1]  # position t predicts token t+1
    targets = labels[:, 1:].to(logits.device)
    scored = targets != ignore_index
    nll = torch.zeros(targets.shape, dtype=torch.float32, device=logits.device)
    nll[scored] = torch.nn.functional.cross_entropy(logits[scored].float(), targets[scored], reduction="none")
    return nll


@torch.no_grad()
def continuation_nll(
    model,
    tokenizer,
    prompts: Sequence[str],
    continuations: Sequence[str],
    *,
    batch_size: int = 16,
    max_tokens: int | None = None,
    batch_tokens: int | None = None,
) -> list[tuple[float, int]]:
    """Summed negative log-likelihood (nats) of each continuation given its prompt, and its length.

    Only the continuation's tokens are scored; the prompt is context. Tokenizing prompt and
    continuation separately keeps the boundary exact (no merge across it). ``max_tokens`` scores
    only a continuation's first tokens (what training saw of a long document). Rows are batched
    by length, so a batch pads little; results come back in the input order. A batch holds at
    most ``batch_size`` rows and, with ``batch_tokens``, at most that many (padded) tokens: many
    short rows then share a pass, and the (rows, width, vocabulary) logits of long ones stay bounded.
    """
    if len(prompts) != len(continuations):
        raise ValueError("prompts and continuations must have the same length")
    device = next(model.parameters()).device
    rows = []
    for prompt, continuation in zip(prompts, continuations, strict=True):
        prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        target_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"][:max_tokens]
        if not target_ids:
            raise ValueError(f"continuation {continuation!r} has no tokens")
        if not prompt_ids:  # score the first token too: condition on BOS/EOS
            prompt_ids = [tokenizer.bos_token_id or tokenizer.eos_token_id]
        rows.append((prompt_ids, target_ids))
    order = sorted(range(len(rows)), key=lambda i: len(rows[i][0]) + len(rows[i][1]))
    batches: list[list[int]] = [[]]
    for index in order:
        width = len(rows[index][0]) + len(rows[index][1])  # the longest so far: sorted ascending
        full = len(batches[-1]) >= batch_size or (
            batch_tokens is not None and (len(batches[-1]) + 1) * width > batch_tokens
        )
        if batches[-1] and full:
            batches.append([])
        batches[-1].append(index)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(rows)
    for batch in batches:
        if not batch:
            continue
        width = max(len(rows[i][0]) + len(rows[i][1]) for i in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), -100, dtype=torch.long)
        for row, i in enumerate(batch):
            prompt_ids, target_ids = rows[i]
            ids = prompt_ids + target_ids
            input_ids[row, : len(ids)] = torch.tensor(ids)  # right padding: positions stay 0..n
            attention[row, : len(ids)] = 1
            labels[row, len(prompt_ids) : len(ids)] = torch.tensor(target_ids)
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits
        nll = token_nll(logits, labels)  # (B, T-1)
        counts = (labels[:, 1:] != -100).sum(dim=1)
        for row, i in enumerate(batch):
            results[i] = (float(nll[row].sum()), int(counts[row]))
    return results


def mean_token_nll(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> float:
    """Mean per-token NLL over all texts (exp of it is the perplexity)."""
    scored = continuation_nll(model, tokenizer, [""] * len(texts), list(texts), batch_size=batch_size)
    total = sum(nll for nll, _ in scored)
    tokens = sum(n for _, n in scored)
    return total / tokens


def perplexity(model, tokenizer, texts: Sequence[str], *, batch_size: int = 16) -> float:
    return float(torch.exp(torch.tensor(mean_token_nll(model, tokenizer, texts, batch_size=batch_size))))


@torch.no_grad()
def shared_prompt_nll(model, tokenizer, prompt: str, continuations: Sequence[str]) -> list[tuple[float, int]]:
    """``continuation_nll`` for many continuations of one prompt, the prompt computed once.

    The prompt runs alone and its KV cache is copied to one row per continuation, so a long
    prompt (retrieved passages before a multiple-choice item) costs one pass instead of one per
    option. Continuations are right-padded: under the causal mask a pad only affects positions
    after it, which are not scored.
    """
    if not continuations:
        return []
    device = next(model.parameters()).device
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
    if not prompt_ids:  # score the first token too: condition on BOS/EOS
        prompt_ids = [tokenizer.bos_token_id or tokenizer.eos_token_id]
    targets = [tokenizer(c, add_special_tokens=False)["input_ids"] for c in continuations]
    for continuation, ids in zip(continuations, targets, strict=True):
        if not ids:
            raise ValueError(f"continuation {continuation!r} has no tokens")
    # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in accepted else "past_key_values"
    keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}  # only the last position
    out = model(input_ids=torch.tensor([prompt_ids], device=device), use_cache=True, **keep)
    first = torch.log_softmax(out.logits[0, -1].float(), dim=-1)  # (V,): each continuation's 1st token
    cache = getattr(out, cache_arg)
    cache.batch_repeat_interleave(len(targets))
    width = max(len(t) for t in targets)
    input_ids = torch.full((len(targets), width), tokenizer.pad_token_id, dtype=torch.long)
    for i, ids in enumerate(targets):
        input_ids[i, : len(ids)] = torch.tensor(ids)
    positions = torch.arange(len(prompt_ids), len(prompt_ids) + width).expand(len(targets), -1)
    logits = model(
        input_ids=input_ids.to(device), position_ids=positions.to(device), **{cache_arg: cache}
    ).logits  # (K, W, V): position j predicts token j+1
    results = []
    for i, ids in enumerate(targets):
        nll = -float(first[ids[0]])
        if len(ids) > 1:
            rest = torch.log_softmax(logits[i, : len(ids) - 1].float(), dim=-1)  # (L-1, V)
            nll -= float(rest.gather(1, torch.tensor(ids[1:], device=device)[:, None]).sum())
        results.append((nll, len(ids)))
    return results


def _cache_argument(model) -> tuple[str, dict]:
    """The forward's name for the KV cache, and ``logits_to_keep=1`` where the model accepts it."""
    # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes).
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    accepted = inspect.signature(base.forward).parameters
    cache_arg = "cache" if "cache" in accepted else "past_key_values"
    return cache_arg, ({"logits_to_keep": 1} if "logits_to_keep" in accepted else {})


@torch.no_grad()
def options_nll(
    model,
    tokenizer,
    prompts: Sequence[str],
    options: Sequence[Sequence[str]],
    *,
    prompt_tokens: int = 4096,
    option_tokens: int = 1024,
) -> list[list[tuple[float, int]]]:
    """Per prompt, ``continuation_nll`` of each of its options: many prompts per forward pass.

    Prompts of similar length are batched together (left-padded, up to ``prompt_tokens`` tokens
    a pass) and each batch's KV cache is copied to one row per option, so every prompt is
    computed once however many options it has, and many prompts share one call: on CPU a
    forward's fixed cost dominates short rows. The options then run right-padded (at most
    ``option_tokens`` tokens a pass, which bounds the (rows, width, vocabulary) logits). Under
    the causal mask a pad only affects positions after it, and left pads are masked out, so
    the scores are those of one row at a time.
    """
    if len(prompts) != len(options):
        raise ValueError("prompts and options must have the same length")
    fallback = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    prompt_ids = []
    for prompt in prompts:
        ids = tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        prompt_ids.append(ids or [fallback])  # an empty prompt: score the first token after BOS/EOS
    option_ids = []
    for opts in options:
        encoded = [tokenizer(o, add_special_tokens=False)["input_ids"] for o in opts]
        for text, ids in zip(opts, encoded, strict=True):
            if not ids:
                raise ValueError(f"option {text!r} has no tokens")
        option_ids.append(encoded)
    order = sorted((i for i in range(len(prompts)) if option_ids[i]), key=lambda i: len(prompt_ids[i]))
    batches: list[list[int]] = [[]]
    for index in order:
        batch = [*batches[-1], index]
        width = len(prompt_ids[index])  # the longest so far: sorted ascending
        k = max(len(option_ids[i]) for i in batch)
        w = max(len(ids) for i in batch for ids in option_ids[i])
        if len(batch) > 1 and (len(batch) * width > prompt_tokens or len(batch) * k * w > option_tokens):
            batches.append([index])
        else:
            batches[-1] = batch
    results: list[list[tuple[float, int]]] = [[] for _ in prompts]
    for batch in batches:
        if batch:
            scored = _score_options(
                model, tokenizer, [prompt_ids[i] for i in batch], [option_ids[i] for i in batch]
            )
            for index, rows in zip(batch, scored, strict=True):
                results[index] = rows
    return results


def _score_options(model, tokenizer, prompt_ids, option_ids) -> list[list[tuple[float, int]]]:
    device = next(model.parameters()).device
    cache_arg, keep = _cache_argument(model)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    b, tp = len(prompt_ids), max(len(p) for p in prompt_ids)
    k = max(len(o) for o in option_ids)
    w = max(len(ids) for opts in option_ids for ids in opts)
    ids = torch.full((b, tp), pad, dtype=torch.long)
    mask = torch.zeros((b, tp), dtype=torch.long)
    for i, p in enumerate(prompt_ids):  # left padding: every prompt ends at the last column
        ids[i, tp - len(p) :] = torch.tensor(p)
        mask[i, tp - len(p) :] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    out = model(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        position_ids=positions.to(device),
        use_cache=True,
        **keep,
    )
    first = torch.log_softmax(out.logits[:, -1].float(), dim=-1)  # (B, V): each option's 1st token
    cache = getattr(out, cache_arg)
    cache.batch_repeat_interleave(k)
    rows = torch.full((b * k, w), pad, dtype=torch.long)
    for i, opts in enumerate(option_ids):
        for j in range(k):
            option = opts[j] if j < len(opts) else opts[0]  # a filler row for a shorter option list
            rows[i * k + j, : len(option)] = torch.tensor(option)
    lengths = torch.tensor([len(p) for p in prompt_ids])
    option_positions = (lengths[:, None] + torch.arange(w)[None, :]).repeat_interleave(k, dim=0)
    option_mask = torch.cat([mask.repeat_interleave(k, dim=0), torch.ones((b * k, w), dtype=torch.long)], 1)
    logits = model(
        input_ids=rows.to(device),
        attention_mask=option_mask.to(device),
        position_ids=option_positions.to(device),
        **{cache_arg: cache},
    ).logits  # (B*K, W, V): position j predicts token j+1
    rest = torch.log_softmax(logits[:, :-1].float(), dim=-1) if w > 1 else None  # (B*K, W-1, V)
    results = []
    for i, opts in enumerate(option_ids):
        results.append([])
        for j, option in enumerate(opts):
            nll = -float(first[i, option[0]])
            if len(option) > 1:
                targets = torch.tensor(option[1:], device=rest.device)[:, None]
                nll -= float(rest[i * k + j, : len(option) - 1].gather(1, targets).sum())
            results[-1].append((nll, len(option)))
    return results
