"""The task table: which adapter (or which weighted A/B arms) serves each task id.

Tasks are the stable names clients send (`X-Task-Id`); the adapter behind a task can change
without clients noticing (a new adapter version, an A/B experiment, a rollback)."""

from __future__ import annotations

import re
import threading
from dataclasses import dataclass

# Task and adapter names travel in headers, URLs and metric labels: keep them plain.
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}$")


class TaskTableError(ValueError):
    """A task table entry is malformed."""


class UnknownTaskError(TaskTableError):
    """No task of that name is in the table."""

    def __init__(self, task: str) -> None:
        super().__init__(f"task {task!r} is not in the task table; add it with PUT /v1/tasks/{task} or --task")
        self.task = task


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME_PATTERN.match(name):
        raise TaskTableError(
            f"{what} name {name!r} is invalid; use 1-128 characters from letters, digits and ._:/- "
            "starting with a letter or digit"
        )
    return name


@dataclass(frozen=True)
class TaskRoute:
    """One task's target: a single adapter, or A/B arms with relative weights."""

    arms: tuple[tuple[str, float], ...]  # (adapter name, weight > 0), sorted by name for stable hashing

    @classmethod
    def single(cls, adapter: str) -> "TaskRoute":
        return cls(((check_name(adapter, "adapter"), 1.0),))

    @classmethod
    def weighted(cls, arms: dict[str, float]) -> "TaskRoute":
        if not arms:
            raise TaskTableError("an A/B task needs at least one arm, e.g. {\"arms\": {\"a\": 0.5, \"b\": 0.5}}")
        checked = []
        for adapter, weight in sorted(arms.items()):
            check_name(adapter, "adapter")
            if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not weight > 0:
                raise TaskTableError(f"arm {adapter!r} has weight {weight!r}; weights must be positive numbers")
            checked.append((adapter, float(weight)))
        return cls(tuple(checked))

    @property
    def adapters(self) -> list[str]:
        return [adapter for adapter, _ in self.arms]

    @property
    def is_ab(self) -> bool:
        return len(self.arms) > 1

    def to_json(self) -> dict:
        if self.is_ab:
            return {"arms": dict(self.arms)}
        return {"adapter": self.arms[0][0]}


class TaskTable:
    """Task name -> TaskRoute; thread-safe because admin requests and routing run concurrently."""

    def __init__(self, routes: dict[str, TaskRoute] | None = None) -> None:
        self._lock = threading.Lock()
        self._routes: dict[str, TaskRoute] = {}
        for task, route in (routes or {}).items():
            self.put(task, route)

    def put(self, task: str, route: TaskRoute) -> None:
        check_name(task, "task")
        with self._lock:
            self._routes[task] = route

    def get(self, task: str) -> TaskRoute:
        with self._lock:
            route = self._routes.get(task)
        if route is None:
            raise UnknownTaskError(task)
        return route

    def __contains__(self, task: object) -> bool:
        with self._lock:
            return task in self._routes

    def remove(self, task: str) -> TaskRoute:
        with self._lock:
            route = self._routes.pop(task, None)
        if route is None:
            raise UnknownTaskError(task)
        return route

    def snapshot(self) -> dict[str, TaskRoute]:
        with self._lock:
            return dict(sorted(self._routes.items()))

    def tasks_using(self, adapter: str) -> list[str]:
        """Tasks that route (some of) their traffic to `adapter`."""
        return [task for task, route in self.snapshot().items() if adapter in route.adapters]


def parse_task_spec(spec: str) -> tuple[str, TaskRoute]:
    """`TASK=ADAPTER` or `TASK=A:0.9,B:0.1` (A/B arms with weights), as `--task` takes them."""
    task, sep, target = spec.partition("=")
    if not sep or not task or not target:
        raise TaskTableError(f"--task {spec!r} must look like TASK=ADAPTER or TASK=A:0.9,B:0.1")
    if "," not in target and not re.search(r":[0-9.]+$", target):
        return check_name(task, "task"), TaskRoute.single(target)
    arms: dict[str, float] = {}
    for part in target.split(","):
        adapter, colon, weight = part.rpartition(":")
        try:
            arms[adapter] = float(weight)
        except ValueError:
            raise TaskTableError(f"--task {spec!r}: arm {part!r} must look like ADAPTER:WEIGHT") from None
        if not colon:
            raise TaskTableError(f"--task {spec!r}: arm {part!r} must look like ADAPTER:WEIGHT")
    return check_name(task, "task"), TaskRoute.weighted(arms)


def route_from_json(body: object) -> TaskRoute:
    """A route from its JSON form: `{"adapter": name}` or `{"arms": {name: weight, ...}}`."""
    if isinstance(body, str):
        return TaskRoute.single(body)
    if isinstance(body, dict):
        if "adapter" in body and "arms" not in body:
            return TaskRoute.single(body["adapter"])
        if "arms" in body and "adapter" not in body and isinstance(body["arms"], dict):
            return TaskRoute.weighted(body["arms"])
    raise TaskTableError(
        f"task route {body!r} is malformed; give {{\"adapter\": NAME}} or {{\"arms\": {{NAME: WEIGHT, ...}}}}"
    )
