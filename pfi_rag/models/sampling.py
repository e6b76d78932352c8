"""What sampling does to one row's next-token logits besides temperature/top-k/top-p, as pure functions.

- ``logit_bias``: added to the given tokens' logits (OpenAI's -100..100; -100 bans a token,
  100 all but forces it);
- ``frequency_penalty`` / ``presence_penalty`` (OpenAI's -2..2): subtracted from the logit of
  every token already generated, once per occurrence / once if it occurred at all::

      logit[t] -= frequency_penalty * count[t] + presence_penalty * (count[t] > 0)

  Only the generated tokens count, not the prompt (OpenAI's definition);
- log-probabilities of the chosen token and the most likely alternatives, from the model's
  own distribution (log-softmax of the raw logits, before any bias, penalty or temperature).

Greedy rows take the adjusted logits' argmax; sampled rows sample from them as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TokenLogprob:
    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()  # (token id, logprob), most likely first


def adjusts(params) -> bool:
    """Whether ``params`` (a SamplingParams) change the logits at all."""
    return bool(params.logit_bias) or params.frequency_penalty != 0.0 or params.presence_penalty != 0.0


def adjust_logits(logits: torch.Tensor, generated: Sequence[int], params) -> torch.Tensor:
    """One row's logits (V,) with ``params``' logit bias and penalties applied (a new tensor)."""
    out = logits.clone()
    if params.logit_bias:
        ids = torch.tensor([token for token, _ in params.logit_bias], device=out.device)
        bias = torch.tensor([value for _, value in params.logit_bias], device=out.device, dtype=out.dtype)
        out.index_add_(0, ids, bias)
    if generated and (params.frequency_penalty or params.presence_penalty):
        counts = torch.bincount(torch.tensor(list(generated), device=out.device), minlength=out.numel())
        counts = counts[: out.numel()].to(out.dtype)  # (V,)
        out -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0).to(out.dtype)
    return out


def adjusted(rows: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """The batch's logits (B, V) with each row's bias and penalties; ``logits`` itself when none has any."""
    if not any(adjusts(row.params) for row in rows):
        return logits
    out = logits.clone()
    for i, row in enumerate(rows):
        if adjusts(row.params):
            out[i] = adjust_logits(logits[i], row.token_ids, row.params)
    return out


def token_logprob(logits: torch.Tensor, token: int, top: int) -> TokenLogprob:
    """The chosen token's log-probability under ``logits`` (V,) and the ``top`` most likely tokens'."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    best = torch.topk(logp, min(top, logp.numel())) if top > 0 else None
    alternatives = (
        ()
        if best is None
        else tuple(
            (int(i), float(v)) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)
        )
    )
    return TokenLogprob(token_id=int(token), logprob=float(logp[token]), top=alternatives)


def record_logprobs(rows: Sequence, logits: torch.Tensor, tokens: torch.Tensor) -> None:
    """Append each row's chosen token's logprob to ``row.logprobs`` when its params ask for them."""
    for i, row in enumerate(rows):
        if row.params.logprobs is not None:
            row.logprobs.append(token_logprob(logits[i], int(tokens[i]), row.params.logprobs))


# -- repetition control (server-side defaults for answer quality, serving.repetition_penalty and
# serving.no_repeat_ngram) -------------------------------------------------------------------------


def repeated_ngram_tokens(generated: Sequence[int], n: int) -> list[int]:
    """Tokens that would complete an ``n``-gram already in ``generated`` (HF's no_repeat_ngram_size).

    Small models loop ("I said, "I said, ..."); banning a repeated n-gram breaks the loop at its
    second turn. Only generated tokens count, so copying a phrase from the notes stays possible.
    """
    if n < 1 or len(generated) < n:
        return []
    prefix = tuple(generated[len(generated) - n + 1 :])
    starts = range(len(generated) - n + 1)
    return [generated[i + n - 1] for i in starts if tuple(generated[i : i + n - 1]) == prefix]


def repetition_adjusted(rows: Sequence, logits: torch.Tensor) -> torch.Tensor:
    """The batch's logits (B, V) with each row's repetition penalty and n-gram block applied.

    The penalty is CTRL's (Keskar et al. 2019, HF's ``repetition_penalty``): a generated token's
    positive logit is divided by it, a negative one multiplied, over the generated tokens only.
    """
    out = logits
    for i, row in enumerate(rows):
        penalty = getattr(row.params, "repetition_penalty", 1.0)
        ngram = getattr(row.params, "no_repeat_ngram", 0)
        if not row.token_ids or (penalty == 1.0 and ngram < 1):
            continue
        if out is logits:
            out = logits.clone()
        if penalty != 1.0:
            seen = torch.tensor(sorted(set(row.token_ids)), device=out.device)
            scores = out[i, seen]
            out[i, seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
        banned = repeated_ngram_tokens(row.token_ids, ngram)
        if banned:
            out[i, torch.tensor(banned, device=out.device)] = float("-inf")
    return out
