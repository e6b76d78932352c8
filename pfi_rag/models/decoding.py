"""One decoding loop for single requests and mixed-adapter batches, with rows joining mid-flight.

Why our own loop rather than ``model.generate``: every row of a batch keeps its own sampling
settings, seed, stop strings and token limit, streams its own text, and leaves the batch when
it finishes; new rows join between steps (continuous admission) by merging their KV cache into
the running one. A row's output therefore does not depend on what it was batched with: greedy
rows pick the same tokens, sampled rows draw from their own seeded generator.

Layout of a running batch (B rows, T cached positions, left padded)::

    cache        DynamicCache of PreallocatedLayer, keys/values (B, heads, T, head_dim)
    mask         (B, T)  1 where a real token is cached
    next_tokens  (B,)    the token each row feeds at the next step
    row.length           real tokens cached for that row (= the next token's position id)

Rows are joined by padding the shorter side on the left with masked positions, which is what
``generate`` does with left-padded prompts.
"""

from __future__ import annotations

import contextlib
import inspect
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import DynamicCache, DynamicLayer

from pfi_rag.models import sampling
from pfi_rag.models.kv_cache import PreallocatedLayer, preallocated_cache
from pfi_rag.models.sampling import TokenLogprob

BASE_ADAPTER = "__base__"  # peft's name for "no adapter" in a mixed batch


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 = no top-k cut
    seed: int | None = None
    stop: tuple[str, ...] = ()
    # OpenAI's sampling extras, applied by pfi_rag.models.sampling (0 / () / None: off).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()  # (token id, bias)
    logprobs: int | None = None  # record each token's logprob and this many alternatives
    # Server-side answer quality (sampling.repetition_adjusted): 1.0 / 0 are off.
    repetition_penalty: float = 1.0
    no_repeat_ngram: int = 0

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


@dataclass(eq=False)
class Row:
    """One sequence being decoded: its prompt, adapter, settings, and what it produced so far."""

    prompt_ids: list[int]
    adapter_name: str
    params: SamplingParams
    slot: int | None = None  # the adapter's gathered-LoRA slot (0: none; None: PEFT's path)
    on_text: Callable[[str], None] | None = None  # receives text pieces as they become final
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    finish_reason: str | None = None  # "stop" (eos or a stop string), "length" or "cancelled"
    length: int = 0
    _emitted: int = 0
    _generator: torch.Generator | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)  # per sampled token, when params ask


def _left_pad(tensor: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    missing = width - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)


def _held_back(text: str, stops: Sequence[str]) -> int:
    """Characters at the end of ``text`` that could still become a stop string (not streamed yet)."""
    longest = 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:size]):
                longest = size
                break
    return longest


class DecodeBatch:
    """Rows decoded together in one forward pass per step, each with its own adapter.

    ``lock`` is held around every forward pass, so adapters can be loaded into the same model
    from another thread between steps.
    """

    def __init__(
        self,
        model,
        tokenizer,
        *,
        eos_ids: Sequence[int],
        lock: threading.Lock | None = None,
        identity_adapter: str | None = None,
        gathered=None,
        prefix=None,
        compiled=None,
        lean=None,
    ):
        self.model = model
        # A PrefixCache (prefix_cache.py): rows whose prompt starts with its tokens reuse their
        # adapter's keys and values of it instead of computing them again. Gathered LoRA only.
        self.prefix = prefix if gathered is not None else None
        # A CompiledDecode (compiled.py) runs the one-token steps; prefill stays eager.
        self.compiled = compiled
        # A LeanStep (lean_step.py) runs the one-token steps of gathered-LoRA batches on fused
        # weights; prefill, and every step of a model it does not fit, stay on the model's forward.
        self.lean = lean if gathered is not None and compiled is None else None
        # A GatheredLoRA holding every loaded adapter in a slot: one batched product per LoRA layer
        # for a mixed batch instead of PEFT's loop over the adapters present.
        self.gathered = gathered
        # An adapter that leaves the model unchanged (LoRA B = 0), so base-only batches can take
        # the single-adapter path too.
        self.identity_adapter = identity_adapter
        self.tokenizer = tokenizer
        self.eos_ids = set(eos_ids)
        self.lock = lock or threading.Lock()
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(self.eos_ids)
        self.rows: list[Row] = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None
        self.next_tokens: torch.Tensor | None = None
        # transformers 5 renamed ``past_key_values`` to ``cache`` (the old name warns, then goes).
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._is_peft = hasattr(model, "peft_config")
        accepted = inspect.signature(base.forward).parameters
        self._cache_arg = "cache" if "cache" in accepted else "past_key_values"
        # Only the last position's logits are needed: on a 200-token prompt the full (T, V)
        # output projection is ~10% of the prefill's work (generate skips it the same way).
        self._keep = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    def __len__(self) -> int:
        return len(self.rows)

    def can_join(self) -> bool:
        """Rows can join a running batch only when every cache layer is a plain growing one."""
        joinable = (DynamicLayer, PreallocatedLayer)
        return self.cache is None or all(type(layer) in joinable for layer in self.cache.layers)

    def _forward(self, input_ids, mask, positions, cache, rows: Sequence[Row], *, step: bool = False):
        slots = [row.slot for row in rows]
        gathered = self.gathered is not None and None not in slots
        if step and gathered and self.lean is not None:
            with self.lock, torch.inference_mode(), self.gathered.rows(slots):
                return self.lean(input_ids, mask, positions, cache)  # (B, V)
        with self.lock, torch.inference_mode():
            # Gathered LoRA routes rows by slot; otherwise PEFT's own adapter selection does.
            routing = self.gathered.rows(slots) if gathered else contextlib.nullcontext()
            extra = {} if gathered else self._select_peft_adapters(rows)
            forward = self.compiled if step and self.compiled is not None else self.model
            with routing:
                out = forward(
                    input_ids=input_ids,
                    attention_mask=mask,
                    position_ids=positions,
                    use_cache=True,
                    **{self._cache_arg: cache},
                    **self._keep,
                    **extra,
                )
        return out.logits[:, -1, :].float()  # (B, V)

    def _select_peft_adapters(self, rows: Sequence[Row]) -> dict:
        """Make PEFT serve ``rows``' adapters (call under the lock); the forward's extra kwargs."""
        adapter_names = [row.adapter_name for row in rows]
        unique = set(adapter_names)
        if not self._is_peft and unique != {BASE_ADAPTER}:
            raise ValueError(f"adapters {sorted(unique)} requested from a model without peft")
        if not self._is_peft:
            return {}
        if len(unique) == 1:
            # One adapter for every row: activate it rather than pass adapter_names, whose
            # hooks walk every module twice per call (a single request's common case).
            single = self.identity_adapter if unique == {BASE_ADAPTER} else next(iter(unique))
            if self.model.active_adapter != single:
                self.model.set_adapter(single, inference_mode=True)
            return {}
        return {"adapter_names": adapter_names}

    def add(self, rows: Sequence[Row]) -> list[Row]:
        """Prefill ``rows`` and merge them into the batch; returns rows already finished."""
        if not rows:
            return []
        if not self.can_join():
            raise RuntimeError("this model's cache cannot take rows mid-flight; start a new batch")
        if self.prefix is not None:
            cached = [r for r in rows if r.slot is not None and self.prefix.matches(r.prompt_ids)]
            if cached:
                others = [r for r in rows if r not in cached]
                return self._add_after_prefix(cached) + (self.add(others) if others else [])
        width = max(len(r.prompt_ids) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            if not row.prompt_ids:
                raise ValueError("a row needs at least one prompt token")
            ids[i, width - len(row.prompt_ids) :] = torch.tensor(row.prompt_ids)
            mask[i, width - len(row.prompt_ids) :] = 1
            self._start(row)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)  # (b, L): left padding keeps positions 0..n-1
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        # Keys and values preallocated with headroom: a step writes in place (kv_cache.py).
        cache = preallocated_cache(getattr(self.model, "config", None))
        logits = self._forward(ids, mask, positions, cache, rows)
        return self._join(rows, cache, mask, logits)

    def _start(self, row: Row) -> None:
        row.length = len(row.prompt_ids)
        if not row.params.greedy:
            row._generator = torch.Generator(device=self.device)
            if row.params.seed is None:
                row._generator.seed()
            else:
                row._generator.manual_seed(row.params.seed)

    def _prefix_layers(self, slots: list[int]) -> dict[int, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Each slot's cached prefix keys/values, computing the missing ones in one forward pass."""
        versions = self.gathered.versions
        found = {slot: self.prefix.get((slot, versions[slot])) for slot in slots}
        missing = [slot for slot, layers in found.items() if layers is None]
        if missing:
            ids = torch.tensor([self.prefix.ids] * len(missing), device=self.device)
            cache = DynamicCache(config=getattr(self.model, "config", None))
            with self.lock, torch.inference_mode(), self.gathered.rows(missing):
                self.model(input_ids=ids, use_cache=True, **{self._cache_arg: cache}, **self._keep)
            for i, slot in enumerate(missing):
                layers = [(c.keys[i : i + 1].clone(), c.values[i : i + 1].clone()) for c in cache.layers]
                self.prefix.put((slot, versions[slot]), layers)
                found[slot] = layers
        return found

    def _add_after_prefix(self, rows: list[Row]) -> list[Row]:
        """Prefill rows that start with the cached prefix: only their own suffixes go through the model.

        Layout per row: ``[prefix][left padding][suffix]``; positions continue from the prefix.
        """
        n = len(self.prefix.ids)
        layers = self._prefix_layers(sorted({row.slot for row in rows}))
        width = max(len(r.prompt_ids) for r in rows) - n
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), n + width), dtype=torch.long)
        mask[:, :n] = 1
        for i, row in enumerate(rows):
            suffix = row.prompt_ids[n:]
            ids[i, width - len(suffix) :] = torch.tensor(suffix)
            mask[i, n + width - len(suffix) :] = 1
            self._start(row)
        positions = (mask.cumsum(-1) - 1)[:, n:]  # (b, width): n.. for the suffix (padding: masked)
        ids, mask, positions = ids.to(self.device), mask.to(self.device), positions.to(self.device)
        cache = preallocated_cache(getattr(self.model, "config", None))
        for index, layer in enumerate(cache.layers):
            layer.lazy_initialization(layers[rows[0].slot][index][0], layers[rows[0].slot][index][1])
            layer.keys = torch.cat([layers[row.slot][index][0] for row in rows])  # (b, kv_heads, n, d)
            layer.values = torch.cat([layers[row.slot][index][1] for row in rows])
        logits = self._forward(ids, mask, positions, cache, rows)
        return self._join(rows, cache, mask, logits)

    def _join(self, rows: Sequence[Row], cache, mask: torch.Tensor, logits: torch.Tensor) -> list[Row]:
        tokens = self._sample(rows, logits)
        if self.cache is None:
            self.rows, self.cache, self.mask, self.next_tokens = list(rows), cache, mask, tokens
        else:
            self._merge(list(rows), cache, mask, tokens)
        return self._advance(rows, tokens.tolist())

    def _merge(self, rows: list[Row], cache: DynamicCache, mask: torch.Tensor, tokens: torch.Tensor) -> None:
        width = max(self.mask.shape[1], mask.shape[1])
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width, 2), _left_pad(theirs.keys, width, 2)])
            mine.values = torch.cat([_left_pad(mine.values, width, 2), _left_pad(theirs.values, width, 2)])
        self.mask = torch.cat([_left_pad(self.mask, width, 1), _left_pad(mask, width, 1)])
        self.next_tokens = torch.cat([self.next_tokens, tokens])
        self.rows.extend(rows)

    def step(self) -> list[Row]:
        """Feed every row its next token; returns the rows that finished (they leave the batch)."""
        if not self.rows:
            return []
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)  # (B, T+1)
        positions = torch.tensor([[r.length] for r in self.rows], device=self.device)  # (B, 1)
        tokens = self.next_tokens[:, None]  # (B, 1)
        logits = self._forward(tokens, self.mask, positions, self.cache, self.rows, step=True)
        for row in self.rows:
            row.length += 1
        self.next_tokens = self._sample(self.rows, logits)
        return self._advance(self.rows, self.next_tokens.tolist())

    def cancel(self, rows: Sequence[Row]) -> None:
        """Take rows out before they finish (a client went away)."""
        leaving = [row for row in rows if row in self.rows]
        for row in leaving:
            row.finish_reason = "cancelled"
        if leaving:
            self._drop(leaving)

    def _sample(self, rows: Sequence[Row], raw: torch.Tensor) -> torch.Tensor:
        logits = sampling.adjusted(rows, raw)  # (B, V): logit bias and penalties
        logits = sampling.repetition_adjusted(rows, logits)  # (B, V): repetition penalty, n-gram block
        tokens = logits.argmax(dim=-1)  # (B,)
        for i, row in enumerate(rows):
            p = row.params
            if p.greedy:
                continue
            # Shift so the best score is 0 before dividing: a tiny temperature then sends the
            # others to -inf instead of overflowing every score to inf (NaN after softmax).
            scores = (logits[i] - logits[i].max()) / p.temperature  # (V,)
            if p.top_k > 0:
                kth = torch.topk(scores, min(p.top_k, scores.numel())).values[-1]
                scores = scores.masked_fill(scores < kth, float("-inf"))
            if p.top_p < 1.0:
                ordered, order = torch.sort(scores, descending=True)
                cumulative = torch.softmax(ordered, dim=-1).cumsum(-1)
                # Drop a token once the ones before it already cover top_p (the first always stays).
                drop = (cumulative - torch.softmax(ordered, dim=-1)) >= p.top_p
                scores = scores.scatter(0, order[drop], float("-inf"))
            probs = torch.softmax(scores, dim=-1)
            tokens[i] = torch.multinomial(probs, 1, generator=row._generator)[0]
        sampling.record_logprobs(rows, raw, tokens)
        return tokens

    def _advance(self, rows: Sequence[Row], tokens: list[int]) -> list[Row]:
        """Record each row's new token, stream its final text, and drop finished rows."""
        for row, token in zip(rows, tokens, strict=True):
            if token in self.eos_ids:
                row.finish_reason = "stop"
            else:
                row.token_ids.append(token)
                if len(row.token_ids) >= row.params.max_new_tokens:
                    row.finish_reason = "length"
            self._update_text(row)
        finished = [row for row in rows if row.finish_reason is not None]
        if finished:
            self._drop(finished)
        return finished

    def _update_text(self, row: Row) -> None:
        text = self.tokenizer.decode(row.token_ids, skip_special_tokens=True)
        stops = row.params.stop
        if stops:
            start = max(0, row._emitted - max(len(s) for s in stops))
            hits = [i for i in (text.find(s, start) for s in stops) if i >= 0]
            if hits:
                text, row.finish_reason = text[: min(hits)], "stop"
        row.text = text
        if row.finish_reason is not None:
            end = len(text)
        elif text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            return
        else:
            end = len(text) - _held_back(text, stops)
        if end > row._emitted:
            if row.on_text is not None:
                row.on_text(text[row._emitted : end])
            row._emitted = end

    def _drop(self, finished: Sequence[Row]) -> None:
        keep = [i for i, row in enumerate(self.rows) if row not in finished]
        self.rows = [self.rows[i] for i in keep]
        if not keep:
            self.cache = self.mask = self.next_tokens = None
            return
        index = torch.tensor(keep, device=self.device)
        self.mask = self.mask[index]
        self.next_tokens = self.next_tokens[index]
        # Columns that are padding for every remaining row carry nothing: cut them.
        first = int(self.mask.any(dim=0).nonzero()[0])
        self.mask = self.mask[:, first:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[index, :, first:]
            layer.values = layer.values[index, :, first:]
