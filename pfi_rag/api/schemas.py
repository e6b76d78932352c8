"""Request and response bodies, layered Base -> Create -> Public (internal records never go out).

Strings and numbers carry their limits here, so OpenAPI documents them and a request outside
them gets a 422 with the field named, before any handler runs.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MAX_TEXT_CHARS = 1_000_000
MAX_PROMPT_CHARS = 100_000


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ErrorDetail(BaseModel):
    type: str
    message: str


class ErrorResponse(BaseModel):
    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIErrorResponse(BaseModel):
    """The error shape of the OpenAI routes (``/v1/chat/completions``, ``/v1/models``)."""

    error: OpenAIErrorDetail


# -- documents ----------------------------------------------------------------------------------


class DocumentBase(Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT_CHARS)
    metadata: dict[str, str | int | float | bool | None] = Field(default_factory=dict, max_length=64)


class DocumentCreate(DocumentBase):
    id: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        pattern=r"^[^\x00-\x1f\x7f]+$",
        description="Stable id; without one it is derived from the text.",
    )


class DocumentsCreate(Strict):
    documents: list[DocumentCreate] = Field(min_length=1, max_length=1000)


class IngestPublic(BaseModel):
    added: int
    unchanged: int
    superseded: int
    chunks: int
    doc_ids: list[str]


class DocumentSummary(BaseModel):
    doc_id: str
    version: int
    source: str
    added_at: str
    chars: int
    metadata: dict[str, Any]


class DocumentList(BaseModel):
    documents: list[DocumentSummary]


class DocumentPublic(DocumentBase):
    model_config = ConfigDict(extra="ignore")
    doc_id: str
    version: int
    source: str
    added_at: str
    chunks: list[str]
    metadata: dict[str, Any]


class Deleted(BaseModel):
    doc_id: str
    deleted: bool


# -- search -------------------------------------------------------------------------------------


class SearchCreate(Strict):
    query: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    k: int = Field(default=4, ge=1, le=100)
    where: dict[str, str | int | float | bool | None] | None = Field(default=None, max_length=16)


class HitPublic(BaseModel):
    doc_id: str
    chunk: int
    score: float
    text: str
    version: int
    metadata: dict[str, Any]


class SearchPublic(BaseModel):
    hits: list[HitPublic]


# -- generation ---------------------------------------------------------------------------------


class SamplingBase(Strict):
    temperature: float = Field(default=0.0, ge=0, le=2, description="0 (or below 1e-4) is greedy.")
    top_p: float = Field(default=1.0, ge=0, le=1, description="Nucleus mass; 0 (or below 1e-6) is greedy.")
    seed: int | None = Field(default=None, ge=0, le=2**63 - 1)


class GenerateCreate(SamplingBase):
    client_id: str = Field(min_length=1, max_length=64)
    prompt: str = Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Default and limit: serving.max_new_tokens."
    )
    top_k: int = Field(default=0, ge=0, le=100_000, description="0 disables the top-k cut.")
    passages: int | None = Field(
        default=None, ge=0, le=100, description="Passages to retrieve (default retrieval.top_k)."
    )
    stop: list[str] = Field(default_factory=list, max_length=8)
    stream: bool = Field(default=False, description="Send server-sent events: `token` pieces, then `result`.")


class Citation(BaseModel):
    number: int
    doc_id: str
    chunk: int | None
    score: float
    cited: bool = Field(description="The answer refers to it as [number].")


class AdapterPublic(BaseModel):
    kind: Literal["client", "global", "base"]
    version: int | None
    round: int | None


class PiiFinding(BaseModel):
    kind: str
    origin: Literal["other-client", "unknown"]


class ProbesPublic(BaseModel):
    flagged: bool
    flags: list[str]
    grounding: float | None
    retrieval_confidence: float | None
    cited: list[int]
    cross_client_spans: int
    pii: list[PiiFinding]
    divergence: float | None
    elapsed_ms: float


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    latency_ms: float


class GeneratePublic(BaseModel):
    text: str
    finish_reason: str
    citations: list[Citation]
    passages_below_floor: int = Field(
        default=0,
        description="Retrieved passages left out of the prompt as under retrieval.relevance_floor "
        "(with no citations: none of the client's notes matched the question).",
    )
    adapter: AdapterPublic
    probes: ProbesPublic
    usage: Usage


# -- chat (OpenAI-compatible) --------------------------------------------------------------------


MAX_CHOICES = 8  # n
MAX_TOP_LOGPROBS = 20  # OpenAI's limit
# Accepted and ignored: bookkeeping that does not change the answer. Any other field OpenAI
# knows (tools, response_format, audio, ...) is refused with a 400 naming it, never ignored.
IGNORED_FIELDS = frozenset(
    {
        "user",
        "store",
        "metadata",
        "service_tier",
        "parallel_tool_calls",
        "prompt_cache_key",
        "safety_identifier",
    }
)


class ContentPart(Strict):
    type: Literal["text"]
    text: str = Field(max_length=MAX_PROMPT_CHARS)


class ChatMessage(BaseModel):
    role: Literal["system", "user", "assistant", "developer"]
    content: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=64)]
    )
    name: str | None = Field(default=None, max_length=64)

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCreate(BaseModel):
    """OpenAI's chat completion request, with OpenAI's defaults (temperature 1).

    Every field changes the answer or is refused: ``tools``, ``response_format`` other than
    text, and the other OpenAI fields this server cannot honour get a 400 naming them.
    """

    model_config = ConfigDict(extra="allow")
    model: str = Field(max_length=256)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    temperature: float | None = Field(default=None, ge=0, le=2, description="Default 1; 0 is greedy.")
    top_p: float | None = Field(default=None, ge=0, le=1, description="Default 1 (no nucleus cut).")
    seed: int | None = Field(default=None, ge=-(2**63), le=2**63 - 1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES, description="Answers to decode (default 1).")
    stop: str | list[str] | None = Field(default=None)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, float] | None = Field(default=None, max_length=300)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    response_format: dict[str, Any] | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[dict[str, Any]] | None = None
    function_call: str | dict[str, Any] | None = None

    @model_validator(mode="after")
    def _total_length(self) -> ChatCreate:
        total = sum(len(m.text()) for m in self.messages)
        if total > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold {total} characters; at most {MAX_PROMPT_CHARS} in all")
        return self


class ModelPublic(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelPublic]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprobPublic(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprobPublic]


class ChatChoiceMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int
    message: ChatChoiceMessage
    finish_reason: Literal["stop", "length"]
    logprobs: ChoiceLogprobs | None = None


class ChatUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class PfiRagExtras(BaseModel):
    citations: list[Citation]
    passages_below_floor: int = Field(
        default=0,
        description="Retrieved passages left out of the prompt as under retrieval.relevance_floor "
        "(with no citations: none of the client's notes matched the question).",
    )
    adapter: AdapterPublic
    probes: ProbesPublic


class ChatPublic(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: ChatUsage
    pfi_rag: PfiRagExtras  # the first choice's citations, adapter and probes
    pfi_rag_choices: list[PfiRagExtras] | None = None  # with n > 1: every choice's, in order


# -- privacy, health, keys ----------------------------------------------------------------------


class SpendPublic(BaseModel):
    at: str
    noise_multiplier: float
    sample_rate: float
    steps: int
    records: int
    max_grad_norm: float | None  # None for a release (round metrics, private probes)
    epsilon_spent: float
    epsilon_after: float
    kind: Literal["dp-sgd", "round-metrics", "probe-release"]


class PrivacyPublic(BaseModel):
    client_id: str
    accountant: str
    delta: float | None
    epsilon_spent: float
    epsilon_max: float
    epsilon_remaining: float
    spends: list[SpendPublic]


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    ready: bool
    generator: str
    embedder: str
    scheduler_running: bool


class KeyPublic(BaseModel):
    key_id: str
    client_id: str | None
    admin: bool
    created_at: str


class KeyList(BaseModel):
    keys: list[KeyPublic]


class KeyCreate(Strict):
    client_id: str = Field(min_length=1, max_length=64, pattern=r"^[a-z0-9][a-z0-9_-]{0,63}$")
    replace: bool = Field(default=False, description="Replace the client's existing key (rotate).")


class KeyIssued(KeyPublic):
    key: str = Field(description="The API key. Shown once: only its hash is stored.")
