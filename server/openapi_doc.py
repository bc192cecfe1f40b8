"""The OpenAPI document (`/openapi.json`) as the server really answers: FastAPI documents a 422
`HTTPValidationError` for bad input, but server.http_errors answers every error, validation
included, with a 4xx (or 5xx) in OpenAI's error body; and the generation endpoints read routing
headers that no parameter declares. SDK generators and schema fuzzers read this document, so it
must say both."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI

from server.schemas import ErrorResponse

_ERROR_REF = {"$ref": "#/components/schemas/ErrorResponse"}
# Headers the generation handlers read from the request itself (not declared as parameters).
_ROUTING_HEADERS = [
    {"name": "X-Task-Id", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "the task whose adapter serves the request (the task table), in place of `model`"},
    {"name": "X-User-Id", "in": "header", "required": False, "schema": {"type": "string"},
     "description": "the sticky unit of A/B experiments when the body has no `user`"},
]
_GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


def install_openapi(app: FastAPI) -> None:
    generate = app.openapi  # FastAPI's own, which caches its document on app.openapi_schema

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            _as_served(generate())  # amended in place, once
        return app.openapi_schema

    app.openapi = openapi


def _as_served(document: dict[str, Any]) -> dict[str, Any]:
    schemas = document.setdefault("components", {}).setdefault("schemas", {})
    schemas.pop("HTTPValidationError", None)
    schemas.pop("ValidationError", None)
    error_schema = ErrorResponse.model_json_schema(ref_template="#/components/schemas/{model}")
    schemas.update(error_schema.pop("$defs", {}))
    schemas["ErrorResponse"] = error_schema
    error = {"description": 'An error in OpenAI\'s shape: {"error": {"message", "type", "param", "code"}}',
             "content": {"application/json": {"schema": _ERROR_REF}}}
    for path, operations in document.get("paths", {}).items():
        for operation in operations.values():
            if path in _GENERATION_PATHS:
                operation.setdefault("parameters", []).extend(_ROUTING_HEADERS)
            responses = operation.setdefault("responses", {})
            responses.pop("422", None)
            responses["4XX"] = error
            responses["5XX"] = error
    return document
