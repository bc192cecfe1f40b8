"""`POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE) or not.

A handler routes the request to an adapter, submits it to the engine and relays the engine's
events. While it waits it polls for a client disconnect and for the request's deadline: either
cancels the generation, which frees its batch row and cache at once."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from uuid import uuid4

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from backbone.sampling import SamplingParams
from server.deps import GrantDep, StateDep
from server.state import ServerState
from server.auth import Grant
from server.engine_errors import PromptTooLongError
from server.http_errors import ApiError, RequestTimeoutError, error_body
from server.metrics import GenerationTimer
from server.prompt_intake import chat_prompt_ids, text_prompt_ids
from server.request_handle import Event, Finished, GenerationRequest, RequestHandle, TextDelta
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChunkDelta,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
    Usage,
)

router = APIRouter()

POLL_S = 0.1  # how often a waiting handler checks for a disconnect and its deadline


class ClientGone(Exception):
    """The client closed the connection; its generation was cancelled."""


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, grant: GrantDep) -> Response:
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    # Templates write their own BOS; special-token text in messages stays text unless configured raw.
    prompt_ids = await chat_prompt_ids(state.tokenizer, messages, state.max_context, state.settings.raw_special_tokens)
    return await _generate(request, state, grant, body, prompt_ids, chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep, grant: GrantDep) -> Response:
    if body.echo:
        raise ApiError(400, "echo is not supported; send echo=false and prepend the prompt yourself", param="echo")
    prompt = body.prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        if len(prompt) != 1:
            raise ApiError(400, f"prompt holds {len(prompt)} prompts; send one prompt per request", param="prompt")
        prompt = prompt[0]
    if isinstance(prompt, str):
        prompt_ids = await text_prompt_ids(state.tokenizer, prompt, state.max_context)
    else:
        prompt_ids = list(prompt)
    return await _generate(request, state, grant, body, prompt_ids, chat=False)


async def _generate(
    request: Request, state: ServerState, grant: Grant, body: SamplingFields, prompt_ids: list[int], chat: bool
) -> Response:
    if body.n != 1:
        raise ApiError(400, f"n={body.n} is not supported; send n=1 and repeat the request for more choices", param="n")
    for penalty in ("presence_penalty", "frequency_penalty"):
        if getattr(body, penalty):
            raise ApiError(400, f"{penalty} is not supported; send 0 (or leave it out)", param=penalty)
    if body.logprobs or body.top_logprobs:
        raise ApiError(400, "logprobs are not supported; leave logprobs and top_logprobs out", param="logprobs")
    request_id = request.state.request_id
    user_key = body.user or request.headers.get("x-user-id") or request_id
    decision = state.router.route(body.model, request.headers.get("x-task-id"), user_key, grant, request_id)
    label = decision.adapter or state.base_name
    request.state.adapter_label = label
    endpoint = "chat" if chat else "completions"
    state.metrics.requests.labels(label, endpoint).inc()
    if decision.task is not None:
        state.metrics.task_requests.labels(decision.task, label).inc()

    params = SamplingParams(
        max_tokens=_capped_max_tokens(len(prompt_ids), body.requested_max_tokens, state.max_context),
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        seed=body.seed,
        stop=list(body.stop),
    )
    live = GenerationRequest(prompt_ids, params, adapter=decision.adapter, tenant=grant.tenant)
    if decision.experiment is None:
        handle = state.engine.submit(live)
    else:  # the experiment records the outcome and may mirror the request to its shadow adapter
        handle = state.experiments.submit(state.engine, live, decision, request_id, request.state.arrival)
    headers = {"X-Adapter": handle.adapter.key if handle.adapter else state.base_name}
    if decision.experiment is not None:
        headers |= {"X-Experiment": decision.experiment, "X-Experiment-Arm": decision.arm}
    reply = Reply(
        id=("chatcmpl-" if chat else "cmpl-") + uuid4().hex,
        model=body.model or state.base_name,
        created=int(time.time()),
        include_usage=body.include_usage,
    )
    waiter = EventWaiter(handle, request, request.state.arrival + state.settings.request_timeout)
    timer = GenerationTimer(state.metrics, label, request.state.arrival, task=decision.task)
    if body.stream:
        events = _stream_chat(reply, waiter, timer) if chat else _stream_completion(reply, waiter, timer)
        return GenerationStream(waiter, events, headers=headers)
    try:
        finished = await _collect(waiter, timer)
    except ClientGone:
        return JSONResponse(error_body("client closed the request", "client_closed"), status_code=499)
    finally:
        waiter.close()
    if finished.finish_reason == "error":
        raise ApiError(500, f"generation failed: {finished.error}", type="internal_error", code="generation_error")
    usage = _usage(finished)
    if chat:
        response = ChatCompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, usage=usage,
            choices=[ChatChoice(message=AssistantMessage(content=finished.text), finish_reason=finished.finish_reason)],
        )
    else:
        response = CompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, usage=usage,
            choices=[CompletionChoice(text=finished.text, finish_reason=finished.finish_reason)],
        )
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


def _capped_max_tokens(prompt_tokens: int, requested: int | None, max_context: int) -> int:
    """`max_tokens` shrunk to what the context leaves; a prompt that leaves no room is refused."""
    room = max_context - prompt_tokens
    if room < 1:
        raise PromptTooLongError(prompt_tokens, requested or 1, max_context)
    return room if requested is None else min(requested, room)


@dataclass(frozen=True)
class Reply:
    """What every chunk of one response repeats."""

    id: str
    model: str
    created: int
    include_usage: bool


class EventWaiter:
    """The handle's events moved onto an asyncio queue by a pump task, so a wait on the next
    event can time out (to poll the client and the deadline) without disturbing the stream."""

    def __init__(self, handle: RequestHandle, request: Request, deadline: float) -> None:
        self.handle = handle
        self.request = request
        self.deadline = deadline
        self.timeout_s = deadline - request.state.arrival
        self.queue: asyncio.Queue[Event] = asyncio.Queue()
        self.last_check = time.monotonic()
        self.pump = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        async for event in self.handle.aevents():
            self.queue.put_nowait(event)

    async def next(self) -> Event:
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                self.handle.cancel()
                raise RequestTimeoutError(self.timeout_s)
            if now - self.last_check >= POLL_S:
                # Checked on a clock, not only when idle: a fast stream must notice a gone client too.
                self.last_check = now
                if await self.request.is_disconnected():
                    self.handle.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), min(POLL_S, self.deadline - now))
            except asyncio.TimeoutError:
                pass

    def close(self) -> None:
        self.handle.cancel()  # a no-op once finished; otherwise nobody will read the rest
        self.pump.cancel()


async def _collect(waiter: EventWaiter, timer: GenerationTimer) -> Finished:
    while True:
        event = await waiter.next()
        if isinstance(event, TextDelta):
            timer.on_tokens(len(event.token_ids))
        else:
            _finish_metrics(timer, event)
            return event


def _finish_metrics(timer: GenerationTimer, finished: Finished) -> None:
    # Counted from Finished, not from deltas: tokens cut by a stop string never reach a delta.
    timer.on_finished(finished.prompt_tokens, finished.completion_tokens, finished.finish_reason)


def _usage(finished: Finished) -> Usage:
    return Usage(
        prompt_tokens=finished.prompt_tokens,
        completion_tokens=finished.completion_tokens,
        total_tokens=finished.prompt_tokens + finished.completion_tokens,
    )


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"


async def _stream_chat(reply: Reply, waiter: EventWaiter, timer: GenerationTimer) -> AsyncIterator[str]:
    def chunk(delta: ChunkDelta, finish_reason: str | None = None) -> str:
        body = ChatCompletionChunk(
            id=reply.id, created=reply.created, model=reply.model,
            choices=[ChatChunkChoice(delta=delta, finish_reason=finish_reason)],
        ).model_dump(mode="json", exclude={"usage"})
        if reply.include_usage:
            body["usage"] = None  # OpenAI's shape: null on every chunk but the last
        return _sse(body)

    yield chunk(ChunkDelta(role="assistant", content=""))
    async for event in _relay(waiter, timer):
        if isinstance(event, TextDelta):
            yield chunk(ChunkDelta(content=event.text))
        elif isinstance(event, Finished):
            yield chunk(ChunkDelta(), event.finish_reason)
            if reply.include_usage:
                usage = ChatCompletionChunk(
                    id=reply.id, created=reply.created, model=reply.model, choices=[], usage=_usage(event)
                )
                yield _sse(usage.model_dump(mode="json"))
        else:
            yield event
    yield SSE_DONE


async def _stream_completion(reply: Reply, waiter: EventWaiter, timer: GenerationTimer) -> AsyncIterator[str]:
    def chunk(text: str, finish_reason: str | None = None) -> str:
        return _sse(
            CompletionResponse(
                id=reply.id, created=reply.created, model=reply.model,
                choices=[CompletionChoice(text=text, finish_reason=finish_reason)],
            ).model_dump(mode="json", exclude={"usage"})
        )

    async for event in _relay(waiter, timer):
        if isinstance(event, TextDelta):
            yield chunk(event.text)
        elif isinstance(event, Finished):
            yield chunk("", event.finish_reason)
            if reply.include_usage:
                usage = CompletionResponse(
                    id=reply.id, created=reply.created, model=reply.model, choices=[], usage=_usage(event)
                )
                yield _sse(usage.model_dump(mode="json"))
        else:
            yield event
    yield SSE_DONE


async def _relay(waiter: EventWaiter, timer: GenerationTimer) -> AsyncIterator[Event | str]:
    """Events for a stream: non-empty text deltas, then Finished; failures after the headers are
    sent become an SSE error event (a str), as OpenAI streams them."""
    while True:
        try:
            event = await waiter.next()
        except ClientGone:
            return
        except ApiError as err:
            yield _sse(error_body(err.message, err.type, err.param, err.code))
            return
        if isinstance(event, TextDelta):
            timer.on_tokens(len(event.token_ids))
            if event.text:
                yield event
            continue
        _finish_metrics(timer, event)
        if event.finish_reason == "error":
            yield _sse(error_body(f"generation failed: {event.error}", "internal_error", code="generation_error"))
        else:
            yield event
        return


class GenerationStream(StreamingResponse):
    """An SSE response that cancels its generation however the stream ends (done, client gone,
    server shutting down), so no row decodes for a reader that is not there."""

    def __init__(self, waiter: EventWaiter, content: AsyncIterator[str], headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers={**headers, "Cache-Control": "no-cache"})
        self.waiter = waiter

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.waiter.close()
