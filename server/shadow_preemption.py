"""Shadow copies give their batch row back when live requests wait for one.

A shadow copy is admitted only after every waiting live request (it has a lower priority), but
once admitted it holds its row to the end, so live requests arriving later would wait behind it.
While shadow copies are in flight, a watcher checks the engine's load; when every row is busy
and at least one live request is waiting, it cancels the newest running shadow copy (the least
work lost), and the engine gives that row to the live request before the next step. A
preempted shadow copy is counted as such and records no output: its text would be cut short.

The watcher looks when the load can have turned that way, not on a timer: the engine announces
each request queued and each admission (`Engine.watch_load`), and a shadow copy's first token
makes it a candidate. Finished rows only free rows, so they need no look. A slow fallback look
covers any change the engine might one day make without announcing it.

Which waiting requests are live is not in the engine's figures; the watcher counts every shadow
copy it has not yet seen a token of as possibly waiting, so it can only under-count live
requests: it may preempt late, never without cause."""

from __future__ import annotations

import asyncio
import logging

from server.engine import Engine
from server.request_handle import Finished, RequestHandle

log = logging.getLogger("loraplex.experiments")

PREEMPT_FALLBACK_S = 1.0  # the longest the watcher waits without an announced change


class ShadowPreemption:
    def __init__(self, fallback_s: float = PREEMPT_FALLBACK_S) -> None:
        self.fallback_s = fallback_s
        self._in_flight: list[RequestHandle] = []  # oldest first
        self._started: set[str] = set()  # request ids of shadow copies that produced a token
        self._preempted: set[str] = set()
        self._watcher: asyncio.Task | None = None
        self._changed: asyncio.Event | None = None  # set when the watcher should look again (its loop's)

    async def follow(self, engine: Engine, handle: RequestHandle) -> tuple[Finished, bool]:
        """Track a submitted shadow copy until it finishes (on the event loop): its end, and
        whether the watcher preempted it."""
        self._in_flight.append(handle)
        if self._watcher is None or self._watcher.done():
            self._changed = asyncio.Event()
            self._watcher = asyncio.get_running_loop().create_task(self._watch(engine, self._changed))
        try:
            async for event in handle.aevents():
                if handle.request_id not in self._started:
                    self._started.add(handle.request_id)
                    self._look_again()  # a shadow copy holding a row is one that can give it back
                if isinstance(event, Finished):
                    return event, handle.request_id in self._preempted
            raise RuntimeError(f"shadow request {handle.request_id} ended without a Finished event")
        finally:
            self._in_flight.remove(handle)
            self._started.discard(handle.request_id)
            self._preempted.discard(handle.request_id)
            self._look_again()  # with the last one gone, the watcher stops

    def check(self, engine: Engine) -> bool:
        """One look at the load: preempt one running shadow copy if live work waits for a row."""
        queued, rows = engine.load()
        running = [h for h in self._in_flight if h.request_id in self._started and not h.done and not h.cancelled]
        maybe_queued_shadows = sum(1 for h in self._in_flight if h.request_id not in self._started and not h.done)
        live_waiting = queued - maybe_queued_shadows
        if rows < engine.config.max_running or live_waiting <= 0 or not running:
            return False
        victim = running[-1]
        self._preempted.add(victim.request_id)
        victim.cancel()
        return True

    def _look_again(self) -> None:
        if self._changed is not None:
            self._changed.set()

    async def _watch(self, engine: Engine, changed: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()

        def announce() -> None:  # on whichever thread changed the load
            try:
                loop.call_soon_threadsafe(changed.set)
            except RuntimeError:  # the loop has closed: nothing is watching any more
                pass

        stop_watching = engine.watch_load(announce)
        try:
            while self._in_flight:
                changed.clear()  # before the look: a change during it means look again
                try:
                    self.check(engine)
                except Exception:  # the engine is stopping: shadow copies simply run to their end
                    log.exception("shadow preemption check failed; no more preemption until the next shadow copy")
                    return
                try:
                    await asyncio.wait_for(changed.wait(), self.fallback_s)
                except asyncio.TimeoutError:  # the builtin only from Python 3.11
                    pass
        finally:
            stop_watching()
