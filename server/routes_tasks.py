"""The task table over HTTP: `GET /v1/tasks`, `GET/PUT/DELETE /v1/tasks/{task}`.

Reading is for any key (filtered to the tasks it may use); changing routes needs an admin key."""

from __future__ import annotations

from fastapi import APIRouter

from router.request_router import AccessDeniedError
from router.task_table import TaskRoute, route_from_json
from server.deps import AdminDep, GrantDep, StateDep
from server.http_errors import ApiError
from server.schemas import TaskEntry, TaskList, TaskRouteBody

router = APIRouter()


def _entry(task: str, route: TaskRoute) -> TaskEntry:
    return TaskEntry(task=task, **route.to_json())


@router.get("/v1/tasks")
async def list_tasks(state: StateDep, grant: GrantDep) -> TaskList:
    routes = state.tasks.snapshot()
    return TaskList(data=[_entry(task, route) for task, route in routes.items() if grant.allows_task(task)])


@router.get("/v1/tasks/{task}")
async def get_task(task: str, state: StateDep, grant: GrantDep) -> TaskEntry:
    if not grant.allows_task(task):
        raise AccessDeniedError("task", task)
    return _entry(task, state.tasks.get(task))


@router.put("/v1/tasks/{task}")
async def put_task(task: str, body: TaskRouteBody, state: StateDep, admin: AdminDep) -> TaskEntry:
    route = route_from_json(body.model_dump(exclude_none=True))
    registered = {info.name for info in state.engine.adapter_infos()}
    missing = [adapter for adapter in route.adapters if adapter not in registered]
    if missing:
        raise ApiError(
            404,
            f"task {task!r} would route to adapter(s) {missing} that are not loaded; "
            "load them first with POST /v1/load_lora_adapter",
            type="not_found_error",
            param="adapter" if body.adapter else "arms",
            code="adapter_not_found",
        )
    state.tasks.put(task, route)
    return _entry(task, route)


@router.delete("/v1/tasks/{task}")
async def delete_task(task: str, state: StateDep, admin: AdminDep) -> TaskEntry:
    return _entry(task, state.tasks.remove(task))
