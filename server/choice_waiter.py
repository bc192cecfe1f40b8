"""The events of one HTTP request's choices (one engine request each), merged in arrival order.

A pump task per handle moves its events onto one asyncio queue, so a wait on the next event can
time out (to poll the client and the deadline) without disturbing the streams. A disconnect or
the deadline cancels every choice, which frees their batch rows and cache at once."""

from __future__ import annotations

import asyncio
import time

from fastapi import Request

from server.http_errors import RequestTimeoutError
from server.request_handle import Event, RequestHandle

POLL_S = 0.1  # how often a waiting handler checks for a disconnect and its deadline


class ClientGone(Exception):
    """The client closed the connection; its generations were cancelled."""


class ChoiceWaiter:
    def __init__(self, handles: list[RequestHandle], request: Request, deadline: float) -> None:
        self.handles = handles
        self.request = request
        self.deadline = deadline
        self.timeout_s = deadline - request.state.arrival
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self.last_check = time.monotonic()
        self.pumps = [asyncio.create_task(self._pump(index, handle)) for index, handle in enumerate(handles)]

    async def _pump(self, index: int, handle: RequestHandle) -> None:
        async for event in handle.aevents():
            self.queue.put_nowait((index, event))

    async def next(self) -> tuple[int, Event]:
        """The next event of any choice, with the choice's index."""
        while True:
            now = time.monotonic()
            if now >= self.deadline:
                self.cancel()
                raise RequestTimeoutError(self.timeout_s)
            if now - self.last_check >= POLL_S:
                # Checked on a clock, not only when idle: a fast stream must notice a gone client too.
                self.last_check = now
                if await self.request.is_disconnected():
                    self.cancel()
                    raise ClientGone()
            try:
                return await asyncio.wait_for(self.queue.get(), min(POLL_S, self.deadline - now))
            except asyncio.TimeoutError:
                pass

    def cancel(self) -> None:
        for handle in self.handles:
            handle.cancel()  # a no-op once finished

    def close(self) -> None:
        self.cancel()  # nobody will read the rest
        for pump in self.pumps:
            pump.cancel()
