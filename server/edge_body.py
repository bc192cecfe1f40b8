"""A request body is bounded in size and in time before any handler parses it.

The body is read here whole and replayed to the app: over `max_bytes` (by Content-Length, or by
counting a chunked upload) is 413; not all there within `timeout` seconds of the headers is 408,
and the connection is closed. Without the time bound a client with a valid key could send its
headers and half a body and hold a connection and a buffer for as long as it liked (a keyless
one is refused before its body is read, by server.edge_auth).
"""

from __future__ import annotations

import asyncio

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.http_errors import ApiError, BodyTooLargeError, to_response


class BodyTimeoutError(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            408,
            f"the request body did not arrive within {seconds:g} s of its headers; send the whole body at once",
            code="body_timeout",
            headers={"Connection": "close"},  # what is left of the body must not be read as a request
        )


class BodyLimitMiddleware:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout = timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "DELETE", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        declared = header_value(scope, b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await to_response(BodyTooLargeError(self.max_bytes))(scope, receive, send)
            return
        try:
            async with asyncio.timeout(self.timeout):
                body = await self._read(receive)
        except TimeoutError:
            await to_response(BodyTimeoutError(self.timeout))(scope, receive, send)
            return
        if body is None:
            return  # the client left before sending its body
        if len(body) > self.max_bytes:
            await to_response(BodyTooLargeError(self.max_bytes))(scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # later reads wait for the disconnect, as handlers expect

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes | None:
        """The whole body, or as much as shows it is over the limit; None if the client left."""
        chunks: list[bytes] = []
        size = 0
        more = True
        while more:
            message = await receive()
            if message["type"] != "http.request":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.max_bytes:
                break
            more = message.get("more_body", False)
        return b"".join(chunks)


def header_value(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None
