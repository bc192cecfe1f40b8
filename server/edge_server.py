"""uvicorn as the edge: connection limits and timeouts from the server settings.

uvicorn arms its keep-alive timer only after a response, so a connection that sends half a
request header and stalls stays open forever; a thousand of them exhaust the file descriptors.
`GuardedH11Protocol` closes a connection whose next request's headers have not fully arrived
within `header_timeout` seconds, whether it just opened or finished a request. Beyond
`limit_concurrency` open connections or running requests, uvicorn answers 503 at once.
"""

from __future__ import annotations

import asyncio
from typing import Any

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from server.app import ServerSettings

CONNECTION_HEADROOM = 64  # connections beyond queued + running requests: health checks, scrapes, admin


class GuardedH11Protocol(H11Protocol):
    header_timeout: float = 10.0  # set per server by `guarded_protocol`

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._header_timer: asyncio.TimerHandle | None = None
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        super().connection_lost(exc)

    def _arm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_overdue, self.cycle)

    def _headers_overdue(self, cycle_when_armed: Any) -> None:
        if self.cycle is cycle_when_armed and not self.transport.is_closing():  # no new request began
            self.transport.close()


def guarded_protocol(header_timeout: float) -> type[GuardedH11Protocol]:
    return type("GuardedH11Protocol", (GuardedH11Protocol,), {"header_timeout": header_timeout})


def uvicorn_config(app: Any, settings: ServerSettings, **overrides: Any) -> uvicorn.Config:
    engine = settings.engine
    limit = settings.limit_concurrency or engine.max_running + engine.max_queued + CONNECTION_HEADROOM
    options = dict(
        host=settings.host,
        port=settings.port,
        http=guarded_protocol(settings.header_timeout),
        limit_concurrency=limit,
        timeout_keep_alive=settings.keep_alive_timeout,
        log_config=None,
        access_log=False,
    )
    return uvicorn.Config(app, **{**options, **overrides})
