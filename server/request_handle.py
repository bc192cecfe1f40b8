"""A request as submitted, and the handle its caller reads the output from.

The engine's worker thread pushes events into the handle; an HTTP handler reads them either
synchronously (`events`, `result`) or from an asyncio loop (`aevents`) without tying up a thread
per stream: the worker wakes the loop with `call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from uuid import uuid4

from backbone.sampling import SamplingParams
from router.adapter_registry import AdapterInfo
from server.logprobs import TokenLogprob


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: str | None = None  # adapter name; None = the base model
    tenant: str = ""  # who asked (the API key's tenant): admission is fair across tenants
    request_id: str = field(default_factory=lambda: uuid4().hex)
    priority: int = 0  # admission order among waiting requests: lower first (shadow copies wait behind live ones)


@dataclass
class TextDelta:
    text: str
    token_ids: list[int]  # the tokens behind `text` (text may lag tokens by a partial character)
    # With params.logprobs: one per token id, then one for the stop token that ended the generation
    # (it has no text and is not counted as a completion token, but a scorer needs its logprob).
    logprobs: list[TokenLogprob] = field(default_factory=list)
    # For a request that scores its prompt: an empty delta carrying them comes once the prompt is
    # in, before any token, so a stream can echo the prompt with its logprobs first.
    prompt_logprobs: list[TokenLogprob | None] | None = None


@dataclass
class Finished:
    finish_reason: str  # "stop" | "length" | "cancelled" | "error"
    text: str  # the whole completion, stop string excluded
    token_ids: list[int]
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    first_token_time: float | None = None  # time.monotonic() of the first generated token
    end_time: float | None = None  # time.monotonic() at finish
    logprobs: list[TokenLogprob] = field(default_factory=list)  # as TextDelta's, for the whole completion
    prompt_logprobs: list[TokenLogprob | None] = field(default_factory=list)  # the first prompt token's is None


Event = TextDelta | Finished


class RequestHandle:
    def __init__(self, request: GenerationRequest, adapter: AdapterInfo | None, on_cancel: Callable[[str], None]) -> None:
        self.request_id = request.request_id
        self.adapter = adapter  # the exact version serving this request, fixed at submit
        self._on_cancel = on_cancel
        self._events: list[Event] = []
        self._finished: Finished | None = None
        self._condition = threading.Condition()
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []
        self.cancelled = False

    # ---- reading (any thread) --------------------------------------------------------------

    def events(self, timeout: float | None = None) -> Iterator[Event]:
        """Each event once, in order, ending with Finished. `timeout` bounds each wait
        (TimeoutError when no event arrives in time)."""
        index = 0
        while True:
            with self._condition:
                if not self._condition.wait_for(lambda: len(self._events) > index, timeout):
                    raise TimeoutError(f"no event from request {self.request_id} within {timeout} s")
                event = self._events[index]
            index += 1
            yield event
            if isinstance(event, Finished):
                return

    async def aevents(self) -> AsyncIterator[Event]:
        """`events` for asyncio handlers: awaits without blocking the loop or a thread."""
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        with self._condition:
            self._waiters.append((loop, ready))
        index = 0
        try:
            while True:
                ready.clear()
                with self._condition:
                    pending = self._events[index:]
                if not pending:
                    await ready.wait()
                    continue
                for event in pending:
                    index += 1
                    yield event
                    if isinstance(event, Finished):
                        return
        finally:
            with self._condition:
                self._waiters.remove((loop, ready))

    def result(self, timeout: float | None = None) -> Finished:
        """Wait for the end; Finished carries the whole text."""
        with self._condition:
            if not self._condition.wait_for(lambda: self._finished is not None, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
            return self._finished  # type: ignore[return-value]

    @property
    def done(self) -> bool:
        return self._finished is not None

    def cancel(self) -> None:
        """Stop generating; the engine frees the row and its cache before its next step."""
        if self._finished is None and not self.cancelled:
            self.cancelled = True
            self._on_cancel(self.request_id)

    # ---- writing (the engine's worker) -----------------------------------------------------

    def push(self, event: Event) -> None:
        with self._condition:
            if self._finished is not None:
                return  # nothing follows Finished
            self._events.append(event)
            if isinstance(event, Finished):
                self._finished = event
            self._condition.notify_all()
            waiters = list(self._waiters)
        for loop, ready in waiters:
            try:
                loop.call_soon_threadsafe(ready.set)
            except RuntimeError:
                pass  # that loop has closed; its reader is gone
