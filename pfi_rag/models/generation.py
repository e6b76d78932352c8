"""Personalized, retrieval-grounded generation: the request, the result, and the engine.

The :class:`Engine` holds the base model once per process, wrapped for per-request adapters,
and answers one request at a time (``generate``, ``stream``). The batching scheduler
(:mod:`pfi_rag.models.batching`) drives the same engine to answer many requests per forward
pass. A request goes through ``prepare`` (adapter lease, passages, prompt: everything that can
refuse bad input), then decoding, then ``finish`` (the result, the lease released).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pfi_rag.config import AdapterConfig, Config, ServingConfig
from pfi_rag.layout import validate_client_id
from pfi_rag.models.adapter_cache import (
    PLACEHOLDER_ADAPTER,
    AdapterCache,
    AdapterLease,
    ServedAdapter,
    serving_model,
)
from pfi_rag.models.compiled import CompiledDecode, wants_compile
from pfi_rag.models.decoding import DecodeBatch, Row, SamplingParams
from pfi_rag.models.gathered_lora import GatheredLoRA
from pfi_rag.models.lean_step import lean_step_for
from pfi_rag.models.prefix_cache import PrefixCache, shared_prefix_ids
from pfi_rag.models.prompting import PassageLike, Prompt, UsedPassage, build_prompt
from pfi_rag.models.sampling import TokenLogprob

logger = logging.getLogger(__name__)

# (client_id, question) -> ranked passages; the retriever's ClientStore.search fits behind it.
Retrieve = Callable[[str, str], Sequence[PassageLike]]


class InvalidRequest(ValueError):
    """A request that cannot be served as given; the message names the field to fix."""


@dataclass(frozen=True)
class GenerationRequest:
    """One question from one client.

    Give ``question`` or ``messages`` (chat turns ending with the user's). ``passages=None``
    lets the engine retrieve from the client's store; a sequence (even empty) is used as is.
    ``temperature=0`` is greedy; ``seed`` makes sampling reproducible. The answer stops at
    end of sequence, at ``max_new_tokens``, or before the first ``stop`` string.
    """

    client_id: str
    question: str | None = None
    messages: Sequence[dict[str, str]] | None = None
    passages: Sequence[PassageLike] | None = None
    max_new_tokens: int | None = None  # None: serving.max_new_tokens
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop: Sequence[str] = ()
    # OpenAI's extras (pfi_rag.models.sampling): penalties -2..2, bias per token id -100..100,
    # and ``logprobs`` = how many alternatives to report per token (None: no logprobs).
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    logit_bias: Sequence[tuple[int, float]] = ()
    logprobs: int | None = None

    def __post_init__(self) -> None:
        try:
            validate_client_id(self.client_id)
        except ValueError as exc:
            raise InvalidRequest(f"client_id: {exc}") from None
        if (self.question is None) == (self.messages is None):
            raise InvalidRequest("give exactly one of question or messages")
        if self.question is not None and not self.question.strip():
            raise InvalidRequest("question is empty")
        if self.messages is not None:
            if not self.messages or self.messages[-1].get("role") != "user":
                raise InvalidRequest("messages must end with a message whose role is 'user'")
            for message in self.messages:
                if message.get("role") not in {"system", "user", "assistant"} or not isinstance(
                    message.get("content"), str
                ):
                    raise InvalidRequest("each message needs a role (system/user/assistant) and text content")
        if self.max_new_tokens is not None and self.max_new_tokens < 1:
            raise InvalidRequest("max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InvalidRequest("temperature must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            raise InvalidRequest("top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidRequest("top_k must be >= 0 (0 disables it)")
        if isinstance(self.stop, str) or any(not isinstance(s, str) or not s for s in self.stop):
            raise InvalidRequest("stop must be a list of non-empty strings")
        for name in ("frequency_penalty", "presence_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise InvalidRequest(f"{name} must be between -2 and 2")
        if any(not isinstance(t, int) or t < 0 or not -100 <= b <= 100 for t, b in self.logit_bias):
            raise InvalidRequest("logit_bias maps token ids (>= 0) to values between -100 and 100")
        if self.logprobs is not None and not 0 <= self.logprobs <= 20:
            raise InvalidRequest("logprobs (alternatives per token) must be between 0 and 20")

    def chat(self) -> list[dict[str, str]]:
        if self.messages is not None:
            return [dict(m) for m in self.messages]
        return [{"role": "user", "content": self.question}]

    @property
    def query(self) -> str:
        """The text retrieval searches for: the last user turn."""
        return self.chat()[-1]["content"]


@dataclass(frozen=True)
class GenerationResult:
    text: str
    token_ids: list[int]  # generated tokens (a stop string's tokens included, end of sequence not)
    passages: list[UsedPassage]  # what went into the prompt, numbered as the answer cites them
    adapter: ServedAdapter
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    passages_below_floor: int = 0  # retrieved but left out: under retrieval.relevance_floor
    logprobs: list[TokenLogprob] | None = None  # one per token of token_ids, when requested

    def as_dict(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "token_ids": self.token_ids,
            "passages": [p.as_dict() for p in self.passages],
            "adapter": self.adapter.as_dict(),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "finish_reason": self.finish_reason,
            "passages_below_floor": self.passages_below_floor,
        }


@dataclass(eq=False)
class PreparedRequest:
    """A request ready to decode: its prompt built and its adapter pinned until ``finish``."""

    request: GenerationRequest
    prompt: Prompt
    lease: AdapterLease
    row: Row


class Engine:
    """The base model, loaded once, answering requests with each client's adapter and passages."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        data_root: Path,
        serving: ServingConfig | None = None,
        adapter: AdapterConfig | None = None,
        retrieve: Retrieve | None = None,
        retrieval_k: int = 4,
        relevance_floor: float | None = None,
    ):
        self.serving = serving or ServingConfig()
        adapter = adapter or AdapterConfig()
        # Takes over ``model``: its modules gain LoRA layers. Callers must not use it directly after.
        self.model = serving_model(model, adapter)
        self.tokenizer = tokenizer
        self.lock = threading.Lock()  # held around each forward pass and each adapter load
        # Loaded adapters stacked in slots: a batch of many adapters is one gathered product per layer.
        self.gathered = None
        if self.serving.gathered_lora:
            self.gathered = GatheredLoRA(self.model, slots=adapter.cache_size, rank=adapter.r)
        self.adapters = AdapterCache(
            self.model,
            data_root,
            max_adapters=adapter.cache_size,
            max_bytes=int(adapter.cache_max_mb * 2**20),
            model_lock=self.lock,
            gathered=self.gathered,
        )
        device = next(self.model.parameters()).device
        compile_step = wants_compile(self.serving.compile_decode, device)
        # The lean one-token step on fused weights (serving.decode_step), for Llama models
        # decoded with gathered LoRA; any other model keeps its own forward (logged once). On a
        # CPU, compile_decode (auto or on) compiles the lean step's one-row products; elsewhere
        # it compiles the model's own forward instead of taking the lean step.
        self.lean = None
        on_cpu = device.type == "cpu"
        wants_lean = self.serving.decode_step == "lean" and self.gathered is not None
        if wants_lean and (on_cpu or not compile_step):
            self.lean = lean_step_for(
                self.model,
                gathered=self.gathered,
                packed_batches=self.serving.batched_weights == "packed",
                compiled_rows=on_cpu and self.serving.compile_decode != "off",
            )
        self.compiled = None  # the model's decode step under torch.compile (serving.compile_decode)
        if compile_step and self.lean is None:
            self.compiled = CompiledDecode(self.model)
        self._prefix: PrefixCache | None = None  # built on first use, for the current system prompt
        self._prefix_prompt: str | None = None
        self.retrieve = retrieve
        self.retrieval_k = retrieval_k
        self.relevance_floor = relevance_floor  # None: every passage given reaches the prompt
        eos = self.model.generation_config.eos_token_id
        eos = list(eos) if isinstance(eos, list | tuple) else [eos]
        self.eos_ids = sorted({tokenizer.eos_token_id, *(e for e in eos if e is not None)} - {None})
        self.max_positions = getattr(self.model.config, "max_position_embeddings", None)

    @classmethod
    def from_config(cls, cfg: Config, *, retrieve: Retrieve | None = None) -> Engine:
        from pfi_rag.models.loading import load_generator
        from pfi_rag.models.quantization import quantize_linear_layers

        model, tokenizer, _ = load_generator(cfg.models)
        quantize_linear_layers(model, cfg.serving.weight_format)  # "none": unchanged
        engine = cls(
            model,
            tokenizer,
            data_root=cfg.data_root,
            serving=cfg.serving,
            adapter=cfg.adapter,
            retrieve=retrieve,
            retrieval_k=cfg.retrieval.top_k,
            relevance_floor=cfg.retrieval.relevance_floor,
        )
        engine.choose_prefill_attention(cfg.models.attn_implementation)
        return engine

    def choose_prefill_attention(self, setting: str) -> None:
        """With ``models.attn_implementation = "auto"``, prefill with SDPA when the lean step decodes.

        "auto" picks eager attention on a CPU because eager decoded faster there; with the lean
        step the model's own forward only prefills, where eager attention writes and rereads a
        (rows, heads, T, T) score tensor in every layer: on long RAG prompts SDPA prefilled 1.6x
        faster on two cores, for the same keys and values up to float rounding (docs/serving.md).
        An explicit setting is kept as it is."""
        if setting == "auto" and self.lean is not None and hasattr(self.model, "set_attn_implementation"):
            self.model.set_attn_implementation("sdpa")

    def prefix_cache(self) -> PrefixCache | None:
        """The cache of the prompt prefix every request shares (None when turned off or without
        gathered LoRA); rebuilt empty if the system prompt changed."""
        if not self.serving.prefix_cache or self.gathered is None:
            return None
        if self._prefix is None or self._prefix_prompt != self.serving.system_prompt:
            ids = shared_prefix_ids(self.tokenizer, self.serving.system_prompt)
            self._prefix = PrefixCache(ids, max_entries=2 * self.gathered.capacity)
            self._prefix_prompt = self.serving.system_prompt
        return self._prefix

    def new_batch(self) -> DecodeBatch:
        return DecodeBatch(
            self.model,
            self.tokenizer,
            eos_ids=self.eos_ids,
            lock=self.lock,
            identity_adapter=PLACEHOLDER_ADAPTER,
            gathered=self.gathered,
            prefix=self.prefix_cache(),
            compiled=self.compiled,
            lean=self.lean,
        )

    def prepare(
        self, request: GenerationRequest, on_text: Callable[[str], None] | None = None
    ) -> PreparedRequest:
        """Check limits, gather passages, build the prompt and pin the adapter. Raises on bad input."""
        max_new = request.max_new_tokens or self.serving.max_new_tokens
        if max_new > self.serving.max_new_tokens:
            raise InvalidRequest(
                f"max_new_tokens {max_new} is over the limit of {self.serving.max_new_tokens} "
                "(serving.max_new_tokens)"
            )
        passages = request.passages
        if passages is None:
            passages = self.retrieve(request.client_id, request.query) if self.retrieve is not None else ()
        prompt = build_prompt(
            self.tokenizer,
            messages=request.chat(),
            passages=passages,
            system_prompt=self.serving.system_prompt,
            max_prompt_tokens=self.serving.max_prompt_tokens,
            relevance_floor=self.relevance_floor,
        )
        if self.max_positions is not None and len(prompt.input_ids) + max_new > self.max_positions:
            raise InvalidRequest(
                f"prompt ({len(prompt.input_ids)} tokens) plus max_new_tokens ({max_new}) exceed the "
                f"model's context of {self.max_positions} tokens"
            )
        # The server's repetition defaults shape every answer, except for a request that sets
        # OpenAI's own controls (penalties, bias, logprobs): that client gets exactly what it asked.
        own_controls = request.logprobs is not None or bool(
            request.frequency_penalty or request.presence_penalty or request.logit_bias
        )
        params = SamplingParams(
            max_new_tokens=max_new,
            temperature=request.temperature,
            top_p=request.top_p,
            top_k=request.top_k,
            seed=request.seed,
            stop=tuple(request.stop),
            frequency_penalty=request.frequency_penalty,
            presence_penalty=request.presence_penalty,
            logit_bias=tuple(request.logit_bias),
            logprobs=request.logprobs,
            repetition_penalty=1.0 if own_controls else self.serving.repetition_penalty,
            no_repeat_ngram=0 if own_controls else self.serving.no_repeat_ngram,
        )
        lease = self.adapters.acquire(request.client_id)
        row = Row(prompt_ids=prompt.input_ids, adapter_name=lease.name, params=params, on_text=on_text)
        row.slot = lease.slot
        return PreparedRequest(request=request, prompt=prompt, lease=lease, row=row)

    def finish(self, job: PreparedRequest) -> GenerationResult:
        job.lease.release()
        return GenerationResult(
            text=job.row.text,
            token_ids=list(job.row.token_ids),
            passages=job.prompt.passages,
            adapter=job.lease.served,
            prompt_tokens=len(job.prompt.input_ids),
            completion_tokens=len(job.row.token_ids),
            finish_reason=job.row.finish_reason or "length",
            passages_below_floor=job.prompt.below_floor,
            logprobs=None if job.row.params.logprobs is None else job.row.logprobs[: len(job.row.token_ids)],
        )

    def generate(self, request: GenerationRequest) -> GenerationResult:
        """Answer one request alone (the scheduler batches many)."""
        return self.generate_together([request])[0]

    def generate_together(self, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
        """Answer ``requests`` in one decode batch, prefilled together: each gets the greedy
        tokens it gets alone (padding changes only float rounding). A request refused in
        ``prepare`` refuses them all, with every adapter lease taken so far released."""
        jobs: list[PreparedRequest] = []
        try:
            for request in requests:
                jobs.append(self.prepare(request))
            batch = self.new_batch()
            batch.add([job.row for job in jobs])
            while len(batch):
                batch.step()
        except BaseException:
            for job in jobs:
                job.lease.release()
            raise
        return [self.finish(job) for job in jobs]

    def stream(self, request: GenerationRequest) -> Iterator[str]:
        """Yield the answer's text as it is decoded, in the caller's thread."""
        pieces: list[str] = []
        job = self.prepare(request, on_text=pieces.append)
        try:
            batch = self.new_batch()
            batch.add([job.row])
            while True:
                yield from pieces
                pieces.clear()
                if not len(batch):
                    break
                batch.step()
        finally:
            job.lease.release()
