"""Experiments over HTTP: `PUT/GET/DELETE /v1/experiments/{name}` (admin), their history and
recorded shadow outputs, and `POST /v1/feedback` (any key that may use the experiment's task)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Literal

from fastapi import APIRouter, Body, Query
from fastapi.concurrency import run_in_threadpool
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from router.experiments import STATUSES, UNIT_KINDS, ExperimentError
from router.request_router import AccessDeniedError
from server.deps import AdminDep, GrantDep, StateDep
from server.experiment_pins import ExperimentAdapterError, PinnedVersionLimitError
from server.experiment_runtime import ExperimentConflictError, UnknownExperimentError, UnknownFeedbackRequestError
from server.http_errors import ApiError

router = APIRouter()


class FeedbackBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    request_id: str = Field(min_length=1, max_length=128)
    reward: float | None = None
    label: str | None = Field(default=None, min_length=1, max_length=128)
    thumbs: Literal["up", "down"] | None = None

    @field_validator("reward")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("reward must be a finite number")
        return value

    @model_validator(mode="after")
    def _exactly_one(self) -> "FeedbackBody":
        given = [name for name in ("reward", "label", "thumbs") if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"send exactly one of reward, label or thumbs (got {given or 'none'})")
        return self


@contextmanager
def _as_http() -> Iterator[None]:
    """The experiment errors as OpenAI error bodies with their status."""
    try:
        yield
    except UnknownExperimentError as err:
        raise ApiError(404, str(err), type="not_found_error", code="experiment_not_found") from None
    except ExperimentAdapterError as err:
        raise ApiError(404, str(err), type="not_found_error", param="arms", code="adapter_not_found") from None
    except ExperimentConflictError as err:
        raise ApiError(409, str(err), type="conflict_error", param="task", code="experiment_conflict") from None
    except PinnedVersionLimitError as err:
        raise ApiError(409, str(err), type="conflict_error", param="arms", code="too_many_pinned_versions") from None
    except UnknownFeedbackRequestError as err:
        raise ApiError(404, str(err), type="not_found_error", param="request_id", code="request_not_found") from None
    except ExperimentError as err:
        raise ApiError(400, str(err), code="invalid_experiment") from None


@router.get("/v1/experiments")
async def list_experiments(state: StateDep, admin: AdminDep) -> dict:
    experiments = state.experiments
    return {"object": "list", "data": [experiments.get(name).to_json() for name in experiments.names()]}


_NAME = {"type": "string", "minLength": 1, "maxLength": 128}
_TIME = {"anyOf": [{"type": "number", "minimum": 0}, {"type": "null"}], "description": "unix seconds"}
# The body is validated by router.experiments.experiment_from_json (its errors name the field and
# the fix); this schema documents the same shape in /openapi.json for clients and fuzzers.
EXPERIMENT_BODY_SCHEMA = {
    "type": "object",
    "required": ["task", "arms"],
    "additionalProperties": False,
    "properties": {
        "name": _NAME,
        "task": _NAME,
        "arms": {
            "type": "array",
            "minItems": 1,
            "items": {
                "type": "object",
                "required": ["name", "adapter"],
                "additionalProperties": False,
                "properties": {"name": _NAME, "adapter": _NAME, "weight": {"type": "number", "minimum": 0}},
            },
        },
        "control": _NAME,
        "unit": {"type": "string", "enum": list(UNIT_KINDS)},
        "status": {"type": "string", "enum": list(STATUSES)},
        "shadow": {
            "anyOf": [
                {"type": "null"},
                {
                    "type": "object",
                    "required": ["adapter"],
                    "additionalProperties": False,
                    "properties": {"adapter": _NAME, "rate": {"type": "number", "exclusiveMinimum": 0, "maximum": 1}},
                },
            ]
        },
        "start_at": _TIME,
        "stop_at": _TIME,
    },
}


# Reading the figures waits for the queued writes to commit: that wait runs in a worker thread,
# never on the event loop. Definitions change on the loop, in order with the requests it routes.
@router.put(
    "/v1/experiments/{name}",
    openapi_extra={"requestBody": {"content": {"application/json": {"schema": EXPERIMENT_BODY_SCHEMA}}}},
)
async def put_experiment(name: str, state: StateDep, admin: AdminDep, body: Any = Body(...)) -> dict:
    with _as_http():
        state.experiments.put(name, body)
        return await run_in_threadpool(state.experiments.summary, name)


@router.get("/v1/experiments/{name}")
async def get_experiment(name: str, state: StateDep, admin: AdminDep) -> dict:
    with _as_http():
        return await run_in_threadpool(state.experiments.summary, name)


@router.delete("/v1/experiments/{name}")
async def delete_experiment(name: str, state: StateDep, admin: AdminDep) -> dict:
    with _as_http():
        summary = await run_in_threadpool(state.experiments.summary, name)
        state.experiments.delete(name)
    return {**summary, "deleted": True}


@router.get("/v1/experiments/{name}/history")
async def experiment_history(name: str, state: StateDep, admin: AdminDep) -> dict:
    """The counters as they were over time (one snapshot a minute at most), for the report."""
    with _as_http():
        experiment = state.experiments.get(name)
    history = await run_in_threadpool(state.experiments.store.history, name)
    return {"experiment": experiment.to_json(), "history": [{"at": at, "counters": counters} for at, counters in history]}


@router.get("/v1/experiments/{name}/shadow_outputs")
async def shadow_outputs(name: str, state: StateDep, admin: AdminDep, limit: int = Query(20, ge=1, le=1000)) -> dict:
    with _as_http():
        state.experiments.get(name)
    return {"object": "list", "data": await run_in_threadpool(state.experiments.store.shadow_outputs, name, limit)}


@router.post("/v1/feedback")
async def post_feedback(body: FeedbackBody, state: StateDep, grant: GrantDep) -> dict:
    with _as_http():
        served = state.experiments.index.peek(body.request_id)
        if served is not None and not grant.allows_task(state.experiments.get(served.experiment).task):
            raise AccessDeniedError("experiment", served.experiment)
        return state.experiments.feedback(body.request_id, body.reward, body.label, body.thumbs)
