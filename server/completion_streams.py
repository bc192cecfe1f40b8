"""Server-sent events for chat and text completions: one chunk per text delta of any choice,
each tagged with its choice index, then `[DONE]`; with `stream_options.include_usage`, a last
chunk with no choices carries the usage (OpenAI's shape: `usage` is null on every other chunk)."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from fastapi.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from server.choice_waiter import ChoiceWaiter, ClientGone
from server.http_errors import ApiError, error_body
from server.logprobs_format import TokenTexts, chat_logprobs, completion_logprobs
from server.metrics import GenerationTimer
from server.request_handle import Event, Finished, TextDelta
from server.schemas import (
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatLogprobs,
    ChunkDelta,
    CompletionChoice,
    CompletionLogprobs,
    CompletionResponse,
    Usage,
)

log = logging.getLogger("loraplex.server")

SSE_DONE = "data: [DONE]\n\n"


@dataclass(frozen=True)
class Prompt:
    ids: list[int]
    text: str | None = None  # the prompt as sent, when it was text (echo returns it as is)


@dataclass
class StreamPlan:
    """What a response holds: choice i answers prompts[i // n]."""

    prompts: list[Prompt]
    n: int
    chat: bool
    logprobs: int | None  # alternatives per token; None = no logprobs
    echo: bool  # completions: the prompt comes back before the completion
    echo_texts: list[str] = field(default_factory=list)  # per prompt, with echo

    @property
    def choices(self) -> int:
        return len(self.prompts) * self.n


@dataclass(frozen=True)
class Reply:
    """What every chunk of one response repeats."""

    id: str
    model: str
    created: int
    include_usage: bool
    request_id: str  # the server's id of the HTTP request, for the log


def usage(plan: StreamPlan, finished: list[Finished]) -> Usage:
    """Each prompt counted once, however many choices answer it (as OpenAI counts)."""
    prompt_tokens = sum(len(prompt.ids) for prompt in plan.prompts)
    completion_tokens = sum(event.completion_tokens for event in finished)
    return Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens, total_tokens=prompt_tokens + completion_tokens)


def _usage_chunk(
    chunk_type: type[ChatCompletionChunk] | type[CompletionResponse], reply: Reply, plan: StreamPlan,
    finished: dict[int, Finished],
) -> str:
    """`stream_options.include_usage`'s last chunk: no choices, the whole request's usage."""
    last = chunk_type(
        id=reply.id, created=reply.created, model=reply.model, choices=[],
        usage=usage(plan, [finished[i] for i in range(plan.choices)]),
    )  # fmt: skip
    return _sse(last.model_dump(mode="json"))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


async def _relay(
    reply: Reply, waiter: ChoiceWaiter, timers: list[GenerationTimer], plan: StreamPlan,
    chunk_type: type[ChatCompletionChunk] | type[CompletionResponse], render: Callable[[int, Event], Iterator[str]],
) -> AsyncIterator[str]:
    """The SSE lines of a response, chat or completion alike: the chunks `render` makes of each
    choice's events until every choice has finished, the usage chunk if asked, then `[DONE]`.
    Failures after the headers are sent become an SSE error event, as OpenAI streams them, and
    end the relay."""
    finished: dict[int, Finished] = {}
    while len(finished) < len(timers):
        try:
            index, event = await waiter.next()
        except ClientGone:
            break
        except ApiError as err:
            yield _sse(error_body(err.message, err.type, err.param, err.code))
            break
        if isinstance(event, TextDelta):
            timers[index].on_tokens(len(event.token_ids))
        else:
            # Counted from Finished, not from deltas: tokens cut by a stop string never reach a delta.
            timers[index].on_finished(event.prompt_tokens, event.completion_tokens, event.finish_reason)
            if event.finish_reason == "error":
                log.error("request %s: choice %d failed: %s", reply.request_id, index, event.error)
                yield _sse(error_body(f"generation failed: {event.error}", "internal_error", code="generation_error"))
                break
            finished[index] = event
        for line in render(index, event):
            yield line
    if reply.include_usage and len(finished) == plan.choices:
        yield _usage_chunk(chunk_type, reply, plan, finished)
    yield SSE_DONE


async def stream_chat(
    reply: Reply, waiter: ChoiceWaiter, timers: list[GenerationTimer], plan: StreamPlan, texts: TokenTexts
) -> AsyncIterator[str]:
    def chunk(index: int, delta: ChunkDelta, finish_reason: str | None = None, logprobs: ChatLogprobs | None = None) -> str:
        body = ChatCompletionChunk(
            id=reply.id, created=reply.created, model=reply.model,
            choices=[ChatChunkChoice(index=index, delta=delta, finish_reason=finish_reason, logprobs=logprobs)],
        ).model_dump(mode="json", exclude={"usage"})  # fmt: skip
        if reply.include_usage:
            body["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return _sse(body)

    def render(index: int, event: Event) -> Iterator[str]:
        if isinstance(event, TextDelta):
            logprobs = chat_logprobs(event.logprobs, texts) if plan.logprobs is not None and event.logprobs else None
            if event.text or logprobs is not None:
                yield chunk(index, ChunkDelta(content=event.text), logprobs=logprobs)
        else:
            yield chunk(index, ChunkDelta(), event.finish_reason)

    for index in range(plan.choices):
        yield chunk(index, ChunkDelta(role="assistant", content=""))
    async for line in _relay(reply, waiter, timers, plan, ChatCompletionChunk, render):
        yield line


async def stream_completion(
    reply: Reply, waiter: ChoiceWaiter, timers: list[GenerationTimer], plan: StreamPlan, texts: TokenTexts
) -> AsyncIterator[str]:
    def chunk(index: int, text: str, finish_reason: str | None = None, logprobs: CompletionLogprobs | None = None) -> str:
        return _sse(
            CompletionResponse(
                id=reply.id, created=reply.created, model=reply.model,
                choices=[CompletionChoice(index=index, text=text, finish_reason=finish_reason, logprobs=logprobs)],
            ).model_dump(mode="json", exclude={"usage"})
        )  # fmt: skip

    offsets = [0] * plan.choices  # text_offset of each choice's next token
    echoed = [not plan.echo] * plan.choices

    def render(index: int, event: Event) -> Iterator[str]:
        if not echoed[index]:  # the choice's first event: the prompt (and its logprobs) go first
            echoed[index] = True
            prompt = plan.prompts[index // plan.n]
            logprobs = None
            if plan.logprobs is not None:
                logprobs, offsets[index] = completion_logprobs(list(zip(prompt.ids, event.prompt_logprobs or [])), texts)
            yield chunk(index, plan.echo_texts[index // plan.n], logprobs=logprobs)
        if isinstance(event, TextDelta):
            logprobs = None
            if plan.logprobs is not None and event.logprobs:
                tokens = [(entry.token_id, entry) for entry in event.logprobs]
                logprobs, offsets[index] = completion_logprobs(tokens, texts, offsets[index])
            if event.text or logprobs is not None:
                yield chunk(index, event.text, logprobs=logprobs)
        else:
            yield chunk(index, "", event.finish_reason)

    async for line in _relay(reply, waiter, timers, plan, CompletionResponse, render):
        yield line


class GenerationStream(StreamingResponse):
    """An SSE response that cancels its generations however the stream ends (done, client gone,
    server shutting down), so no row decodes for a reader that is not there."""

    def __init__(self, waiter: ChoiceWaiter, content: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self.waiter = waiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.waiter.close()
