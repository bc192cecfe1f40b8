"""Every failure becomes one HTTP status and OpenAI's error body, decided in this one place.

`{"error": {"message", "type", "param", "code"}}` — for our own errors, for FastAPI's
validation (422 -> 400, as OpenAI answers bad parameters), 404 and 405, and for anything
unexpected (500, logged with its traceback; the server keeps serving)."""

from __future__ import annotations

import logging
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from adapters.errors import AdapterError, AdapterNotFoundError
from router.path_guard import AdapterPathError, AdapterPathForbiddenError, AdapterPathNotFoundError
from router.request_router import AccessDeniedError, RoutingConflictError, UnknownModelError
from router.task_table import TaskTableError, UnknownTaskError
from server.auth import AdminRequiredError, AuthenticationError
from server.engine_errors import (
    AdapterSupersededError,
    EngineError,
    EngineStoppedError,
    InvalidRequestError,
    PromptTooLongError,
    QueueFullError,
    UnknownAdapterError,
)

log = logging.getLogger("loraplex.server")


class ApiError(Exception):
    """An error the HTTP layer raises itself, with its status and OpenAI fields."""

    def __init__(
        self,
        status: int,
        message: str,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = headers or {}


class RequestTimeoutError(ApiError):
    def __init__(self, seconds: float) -> None:
        super().__init__(
            504,
            f"the request did not finish within {seconds:g} s; ask for fewer max_tokens or retry later",
            type="timeout_error",
            code="request_timeout",
        )


class BodyTooLargeError(ApiError):
    def __init__(self, limit: int) -> None:
        super().__init__(
            413,
            f"request body exceeds {limit} bytes; send a shorter prompt or raise the server's body limit",
            code="request_too_large",
        )


# (error class, status, OpenAI type); the first isinstance match wins, so subclasses come first.
STATUS_TABLE: list[tuple[type[BaseException], int, str]] = [
    (AuthenticationError, 401, "authentication_error"),
    (AdminRequiredError, 403, "permission_error"),
    (AccessDeniedError, 403, "permission_error"),
    (AdapterPathForbiddenError, 403, "permission_error"),
    (AdapterPathNotFoundError, 404, "not_found_error"),
    (AdapterPathError, 400, "invalid_request_error"),
    (UnknownModelError, 404, "not_found_error"),
    (UnknownTaskError, 404, "not_found_error"),
    (UnknownAdapterError, 404, "not_found_error"),
    (RoutingConflictError, 400, "invalid_request_error"),
    (TaskTableError, 400, "invalid_request_error"),
    (AdapterNotFoundError, 400, "invalid_request_error"),
    (AdapterError, 400, "invalid_request_error"),
    (QueueFullError, 429, "rate_limit_error"),
    (PromptTooLongError, 400, "invalid_request_error"),
    (InvalidRequestError, 400, "invalid_request_error"),  # before EngineError: the caller's mistake
    (EngineStoppedError, 503, "service_unavailable"),
    (AdapterSupersededError, 409, "conflict_error"),
    (EngineError, 500, "internal_error"),
    (ValueError, 400, "invalid_request_error"),  # e.g. SamplingParams refusing a value
]

# Seconds a client should wait after a 429: the queue drains at decode speed, so soon.
RETRY_AFTER_S = 1


def error_body(message: str, type: str, param: str | None = None, code: str | int | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _code_of(err: BaseException) -> str:
    """`PromptTooLongError` -> "prompt_too_long": a stable machine-readable code."""
    name = type(err).__name__.removesuffix("Error")
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def to_response(err: BaseException, request_id: str | None = None) -> JSONResponse:
    """The error's response. Every 5xx but a refusal to serve (503) is our own fault, so it is
    logged with the request's id, which the client sees in `X-Request-Id`."""
    if isinstance(err, ApiError):
        if err.status >= 500 and err.status != 503:
            log.error("request %s failed with %d: %s", request_id, err.status, err.message)
        return JSONResponse(
            error_body(err.message, err.type, err.param, err.code), status_code=err.status, headers=err.headers
        )
    for error_class, status, kind in STATUS_TABLE:
        if isinstance(err, error_class):
            headers = {"Retry-After": str(RETRY_AFTER_S)} if status == 429 else {}
            if status == 401:
                headers["WWW-Authenticate"] = "Bearer"
            code = "context_length_exceeded" if isinstance(err, PromptTooLongError) else _code_of(err)
            if status >= 500 and status != 503:
                log.error("request %s failed with %d: %s", request_id, status, err)
            return JSONResponse(error_body(str(err), kind, None, code), status_code=status, headers=headers)
    log.error("unexpected error while serving request %s", request_id, exc_info=err)
    return JSONResponse(
        error_body(f"internal error ({type(err).__name__}); the server logged the details", "internal_error"),
        status_code=500,
    )


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        location = [str(part) for part in first.get("loc", ()) if part != "body"]
        param = ".".join(location) or None
        message = f"{param}: {first.get('msg', 'invalid value')}" if param else first.get("msg", "invalid request body")
        return JSONResponse(error_body(message, "invalid_request_error", param, "invalid_value"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(err.status_code, "invalid_request_error")
        message = {
            404: f"no route {request.url.path}; see the API's endpoints under /v1",
            405: f"method {request.method} is not allowed on {request.url.path}",
        }.get(err.status_code, str(err.detail))
        return JSONResponse(
            error_body(message, kind, None, err.status_code), status_code=err.status_code, headers=err.headers
        )

    async def _domain(request: Request, err: Exception) -> JSONResponse:
        return to_response(err, getattr(request.state, "request_id", None))

    # Registered per class so they are handled responses, not crashes re-raised to the server;
    # anything else is answered by the app's outermost middleware (see server.app).
    for error_class in (ApiError, *(error_class for error_class, _, _ in STATUS_TABLE)):
        app.add_exception_handler(error_class, _domain)
