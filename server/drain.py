"""Graceful drain on SIGTERM: finish what is running, take nothing new, then exit.

On SIGTERM (or Ctrl-C) the replica
1. reports not ready (`/ready` answers 503 "draining"), so gateways and Kubernetes stop sending;
2. stops listening, so a gateway's next connection is refused and it retries on another replica;
3. answers any request that still reaches it on an open keep-alive connection with 503
   `service_unavailable`/`draining` and `Retry-After`, which a gateway may retry elsewhere: the
   request was not started, so the retry cannot duplicate work;
4. lets the requests already running finish (streams included), up to `--drain-timeout` seconds;
5. then shuts the engine down and exits with status 0.
A second signal exits at once (uvicorn's behaviour).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from types import FrameType

import uvicorn
from starlette.types import ASGIApp, Receive, Scope, Send

from server.http_errors import ApiError, to_response

log = logging.getLogger("loraplex.drain")

# Paths that keep answering while draining: probes and scrapes must see the drain happen.
_ALWAYS_SERVED = ("/health", "/ready", "/metrics")


class DrainState:
    def __init__(self) -> None:
        self._started: float | None = None
        self._lock = threading.Lock()

    def begin(self) -> bool:
        """Start draining; False if it had already started."""
        with self._lock:
            if self._started is not None:
                return False
            self._started = time.monotonic()
            return True

    @property
    def draining(self) -> bool:
        return self._started is not None


class DrainingError(ApiError):
    def __init__(self) -> None:
        super().__init__(
            503,
            "this replica is draining for shutdown and takes no new requests; retry on another replica",
            "service_unavailable",
            code="draining",
            headers={"Retry-After": "1", "Connection": "close"},
        )


class DrainMiddleware:
    """503 for new work once the drain has begun; probes and metrics still answer."""

    def __init__(self, app: ASGIApp, drain: DrainState) -> None:
        self.app = app
        self.drain = drain

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.drain.draining and scope["path"] not in _ALWAYS_SERVED:
            await to_response(DrainingError())(scope, receive, send)
            return
        await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn's server, marking the drain before its own graceful shutdown begins."""

    def __init__(self, config: uvicorn.Config, drain: DrainState) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain.begin():
            log.info(
                "draining: not ready, no new requests; waiting up to %s s for running requests",
                self.config.timeout_graceful_shutdown,
            )
        super().handle_exit(sig, frame)
        if sig == signal.SIGTERM:
            # A drained SIGTERM is a replica's normal end: exit 0 instead of uvicorn's re-raising
            # of the signal after shutdown (which makes the exit status "killed by SIGTERM").
            captured = getattr(self, "_captured_signals", [])
            if sig in captured:
                captured.remove(sig)
