"""`POST /v1/chat/completions` and `POST /v1/completions`, streamed (SSE) or not.

A handler routes the request to an adapter and submits one engine request per choice: `n` for
each prompt, each its own batch row (later rows reuse the first one's prompt blocks through the
prefix cache). It then relays the engine's events. While it waits it polls for a client
disconnect and for the request's deadline: either cancels the generations, which frees their
batch rows and cache at once."""

from __future__ import annotations

import time
from contextlib import nullcontext
from uuid import uuid4

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from backbone.sampling import SamplingParams
from router.request_router import RouteDecision
from server.auth import Grant
from server.choice_waiter import ChoiceWaiter, ClientGone
from server.completion_streams import GenerationStream, Prompt, Reply, StreamPlan, stream_chat, stream_completion, usage
from server.deps import GrantDep, StateDep
from server.engine_errors import PromptTooLongError
from server.http_errors import ApiError, error_body
from server.logprobs_format import TokenTexts, chat_logprobs, completion_logprobs
from server.metrics import GenerationTimer
from server.prompt_intake import chat_prompt_ids, text_prompt_ids
from server.request_handle import Finished, GenerationRequest, RequestHandle, TextDelta
from server.schemas import (
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    SamplingFields,
)
from server.state import ServerState
from server.unsupported_fields import refuse_unsupported

router = APIRouter()

SEED_MODULUS = 2**64  # choice i of a seeded request draws from seed + i, wrapped into the seed range


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request, state: StateDep, grant: GrantDep) -> Response:
    refuse_unsupported(body)
    messages = [{"role": m.role, "content": m.text(), **({"name": m.name} if m.name else {})} for m in body.messages]
    # Templates write their own BOS; special-token text in messages stays text unless configured raw.
    prompt_ids = await chat_prompt_ids(state.tokenizer, messages, state.max_context, state.settings.raw_special_tokens)
    return await _generate(request, state, grant, body, [Prompt(prompt_ids)], chat=True)


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request, state: StateDep, grant: GrantDep) -> Response:
    refuse_unsupported(body)
    raw = body.prompt
    batch = isinstance(raw, list) and bool(raw) and not isinstance(raw[0], int)
    items = list(raw) if batch else [raw]
    _check_choices(len(items), body.n, state)  # before tokenizing a batch that will be refused
    prompts = []
    for item in items:
        if isinstance(item, str):
            prompts.append(Prompt(await text_prompt_ids(state.tokenizer, item, state.max_context), item))
        else:
            prompts.append(Prompt(list(item)))
    return await _generate(request, state, grant, body, prompts, chat=False)


def _check_choices(prompts: int, n: int, state: ServerState) -> None:
    limit = state.settings.max_choices
    if prompts * n > limit:
        raise ApiError(
            400,
            f"n={n} for {prompts} prompt(s) asks for {prompts * n} choices, more than this server's limit of {limit}; "
            "ask for fewer choices per request",
            param="n",
        )


async def _generate(
    request: Request, state: ServerState, grant: Grant, body: SamplingFields, prompts: list[Prompt], chat: bool
) -> Response:
    _check_choices(len(prompts), body.n, state)
    request_id = request.state.request_id
    user_key = body.user or request.headers.get("x-user-id") or request_id
    decision = state.router.route(body.model, request.headers.get("x-task-id"), user_key, grant, request_id)
    label = decision.adapter or state.base_name
    request.state.adapter_label = label
    endpoint = "chat" if chat else "completions"
    state.metrics.requests.labels(label, endpoint).inc()
    if decision.task is not None:
        state.metrics.task_requests.labels(decision.task, label).inc()

    plan = _plan(body, prompts, chat)
    requests = [
        GenerationRequest(
            prompt.ids,
            _sampling_params(body, plan, len(prompt.ids), choice, state.max_context),
            adapter=decision.adapter,
            tenant=grant.tenant,
            request_id=request_id if index == 0 else f"{request_id}.{index}",
        )
        for index, (prompt, choice) in enumerate((prompt, choice) for prompt in prompts for choice in range(body.n))
    ]
    handles = _submit_all(state, requests, decision, request_id, request.state.arrival)
    if plan.echo:  # after submit, which has checked the token ids
        plan.echo_texts = [p.text if p.text is not None else state.tokenizer.decode(p.ids) for p in prompts]
    headers = {"X-Adapter": handles[0].adapter.key if handles[0].adapter else state.base_name}
    if decision.experiment is not None:
        headers |= {"X-Experiment": decision.experiment, "X-Experiment-Arm": decision.arm}
    reply = Reply(
        id=("chatcmpl-" if chat else "cmpl-") + uuid4().hex,
        model=body.model or state.base_name,
        created=int(time.time()),
        include_usage=body.include_usage,
        request_id=request_id,
    )
    waiter = ChoiceWaiter(handles, request, request.state.arrival + state.settings.request_timeout)
    timers = [GenerationTimer(state.metrics, label, request.state.arrival, task=decision.task) for _ in handles]
    texts = TokenTexts(state.tokenizer)
    if body.stream:
        stream = stream_chat if chat else stream_completion
        return GenerationStream(waiter, stream(reply, waiter, timers, plan, texts), headers=headers)
    try:
        finished = await _collect(waiter, timers)
    except ClientGone:
        return JSONResponse(error_body("client closed the request", "client_closed"), status_code=499)
    finally:
        waiter.close()
    for event in finished:
        if event.finish_reason == "error":
            raise ApiError(500, f"generation failed: {event.error}", type="internal_error", code="generation_error")
    if chat:
        chat_choices = [
            ChatChoice(
                index=index, message=AssistantMessage(content=event.text), finish_reason=event.finish_reason,
                logprobs=chat_logprobs(event.logprobs, texts) if plan.logprobs is not None else None,
            )
            for index, event in enumerate(finished)
        ]  # fmt: skip
        response = ChatCompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, usage=usage(plan, finished), choices=chat_choices
        )
    else:
        response = CompletionResponse(
            id=reply.id, created=reply.created, model=reply.model, usage=usage(plan, finished),
            choices=[_completion_choice(plan, index, event, texts) for index, event in enumerate(finished)],
        )  # fmt: skip
    return JSONResponse(response.model_dump(mode="json"), headers=headers)


def _plan(body: SamplingFields, prompts: list[Prompt], chat: bool) -> StreamPlan:
    if isinstance(body, ChatCompletionRequest):
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        return StreamPlan(prompts, body.n, chat=True, logprobs=logprobs, echo=False)
    assert isinstance(body, CompletionRequest) and not chat
    return StreamPlan(prompts, body.n, chat=False, logprobs=body.logprobs, echo=body.echo)


def _sampling_params(body: SamplingFields, plan: StreamPlan, prompt_tokens: int, choice: int, max_context: int) -> SamplingParams:
    max_tokens = _capped_max_tokens(prompt_tokens, body.requested_max_tokens, max_context)
    scores_prompt = plan.echo and (plan.logprobs is not None or max_tokens == 0)
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=body.temperature,
        top_p=body.top_p,
        top_k=body.top_k,
        # Each choice draws from its own generator: seed + i keeps choice 0 equal to an n=1 request.
        seed=None if body.seed is None else (body.seed + choice) % SEED_MODULUS,
        stop=list(body.stop),
        logprobs=plan.logprobs,
        prompt_logprobs=(plan.logprobs or 0) if scores_prompt else None,
    )


def _capped_max_tokens(prompt_tokens: int, requested: int | None, max_context: int) -> int:
    """`max_tokens` shrunk to what the context leaves; a prompt that leaves no room is refused
    (unless no token is asked for: an echoed prompt may fill the whole context)."""
    room = max_context - prompt_tokens
    if room < (0 if requested == 0 else 1):
        raise PromptTooLongError(prompt_tokens, requested or 1, max_context)
    return room if requested is None else min(requested, room)


def _submit_all(
    state: ServerState, requests: list[GenerationRequest], decision: RouteDecision, request_id: str, arrival: float
) -> list[RequestHandle]:
    """Submit every choice, or none: a refusal part-way cancels those already queued. All choices
    get the same adapter version, even while a hot swap publishes a new one."""
    handles: list[RequestHandle] = []
    try:
        with state.engine.same_versions() if len(requests) > 1 else nullcontext():
            for index, live in enumerate(requests):
                if index == 0 and decision.experiment is not None:
                    # The experiment records the request once (and may mirror it to its shadow adapter).
                    handles.append(state.experiments.submit(state.engine, live, decision, request_id, arrival))
                else:
                    handles.append(state.engine.submit(live))
    except BaseException:
        for handle in handles:
            handle.cancel()
        raise
    return handles


async def _collect(waiter: ChoiceWaiter, timers: list[GenerationTimer]) -> list[Finished]:
    finished: dict[int, Finished] = {}
    while len(finished) < len(timers):
        index, event = await waiter.next()
        if isinstance(event, TextDelta):
            timers[index].on_tokens(len(event.token_ids))
        else:
            # Counted from Finished, not from deltas: tokens cut by a stop string never reach a delta.
            timers[index].on_finished(event.prompt_tokens, event.completion_tokens, event.finish_reason)
            finished[index] = event
    return [finished[index] for index in range(len(timers))]


def _completion_choice(plan: StreamPlan, index: int, event: Finished, texts: TokenTexts) -> CompletionChoice:
    prompt = plan.prompts[index // plan.n]
    text = plan.echo_texts[index // plan.n] + event.text if plan.echo else event.text
    logprobs = None
    if plan.logprobs is not None:
        tokens = list(zip(prompt.ids, event.prompt_logprobs)) if plan.echo else []
        tokens += [(entry.token_id, entry) for entry in event.logprobs]
        logprobs, _ = completion_logprobs(tokens, texts)
    return CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=event.finish_reason)
