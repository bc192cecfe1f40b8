"""Request and response bodies of the HTTP API, in OpenAI's (and vLLM's, for adapters) shapes.

Requests ignore fields we do not use (OpenAI clients send many) but validate the ones we do;
responses are separate models so a field we accept never leaks into what we return."""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_serializer

from backbone.sampling import MAX_LOGPROBS


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore")


class SamplingFields(_Request):
    model: str = Field(default="", description="a task, an adapter, or the base model's name")
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0, le=2**31 - 1)  # vLLM's extension; 0 = off; the engine caps it at the vocabulary
    seed: int | None = Field(default=None, ge=0, lt=2**64)
    stop: str | list[str] | None = Field(default=None, validate_default=True)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    n: int = Field(default=1, ge=1, le=128)  # OpenAI's bound; the server's max_choices may be lower
    user: str | None = None
    # Bounded as OpenAI bounds them; sampling here has no penalties, so a non-zero one is refused.
    presence_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(default=0.0, ge=-2.0, le=2.0)
    # Chat: alternatives per token, with logprobs=true (as OpenAI). Completions ask with logprobs=N.
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)
    # Fields of OpenAI's or vLLM's API this server does not implement. They are read only so that a
    # request setting one is refused by name (server/unsupported_fields.py) instead of served
    # as if the field were absent.
    logit_bias: Any = None
    best_of: Any = None
    suffix: Any = None
    tools: Any = None
    tool_choice: Any = None
    functions: Any = None
    function_call: Any = None
    response_format: Any = None
    min_tokens: Any = None
    repetition_penalty: Any = None
    min_p: Any = None
    stop_token_ids: Any = None
    ignore_eos: Any = None
    use_beam_search: Any = None
    prompt_logprobs: Any = None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: str | list[str] | None) -> list[str]:
        if value is None:
            return []
        stops = [value] if isinstance(value, str) else value
        if len(stops) > 4 or any(not stop for stop in stops):
            raise ValueError("stop takes up to 4 non-empty strings")
        return stops

    @property
    def include_usage(self) -> bool:
        return bool((self.stream_options or {}).get("include_usage"))


class TextPart(_Request):
    type: Literal["text"]
    text: str


class ChatMessage(_Request):
    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[TextPart] | None = None
    name: str | None = None

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    max_completion_tokens: int | None = Field(default=None, ge=1)  # OpenAI's newer name
    echo: Any = None  # vLLM's chat extension (echo the last message): refused unless off

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


class CompletionRequest(SamplingFields):
    # One prompt (text or token ids) or a batch of them; each prompt gets `n` choices.
    prompt: str | list[Annotated[int, Field(ge=0)]] | list[str] | list[list[Annotated[int, Field(ge=0)]]]
    logprobs: int | None = Field(default=None, ge=0, le=MAX_LOGPROBS)  # the chosen token's and this many alternatives
    max_tokens: int | None = Field(default=16, ge=0)  # OpenAI's default; 0 only with echo (score the prompt)
    echo: bool = False  # the prompt is returned before the completion (with its logprobs, if asked)

    @property
    def requested_max_tokens(self) -> int | None:
        return self.max_tokens


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None  # the token text's UTF-8 bytes


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    """OpenAI's chat shape: one entry per completion token."""

    content: list[ChatTokenLogprob] | None


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy completions shape, parallel lists over the (echoed prompt and) completion
    tokens; the first prompt token has no logprob (null)."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChunkDelta(BaseModel):
    """OpenAI sends `{"role": "assistant", "content": ""}` first, then `{"content": ...}`, then `{}`."""

    role: Literal["assistant"] | None = None
    content: str | None = None

    @model_serializer
    def _present_fields_only(self) -> dict[str, str]:
        return {key: value for key, value in (("role", self.role), ("content", self.content)) if value is not None}


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: ChunkDelta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None


class CompletionResponse(BaseModel):
    """Also the streaming chunk: OpenAI streams completions as `text_completion` objects."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "loraplex"
    root: str | None = None  # vLLM: the adapter's path, or the base's name
    parent: str | None = None  # vLLM: the base model id for an adapter
    version: int | None = None
    warnings: list[str] = Field(default_factory=list)


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class LoadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)
    lora_path: str = Field(min_length=1)


class UnloadLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)


class PinLoraAdapterRequest(_Request):
    lora_name: str = Field(min_length=1)


class AdapterLoaded(BaseModel):
    name: str
    version: int
    path: str
    rank: int
    target_modules: list[str]
    base_model_name_or_path: str | None
    warnings: list[str]
    message: str


class TaskRouteBody(_Request):
    """PUT /v1/tasks/{task}: exactly one of `adapter` or `arms` (A/B weights)."""

    adapter: str | None = None
    arms: dict[str, float] | None = None


class TaskEntry(BaseModel):
    task: str
    adapter: str | None = None
    arms: dict[str, float] | None = None


class TaskList(BaseModel):
    object: Literal["list"] = "list"
    data: list[TaskEntry]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | int | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail
