"""Which adapter serves a request: the `X-Task-Id` header, else the `model` field.

Order of checks matters for tenants: a name the caller may not use is refused (403) before we
look it up, so a tenant cannot probe which tasks or adapters other tenants have."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from router.ab_test import choose_arm
from router.experiments import Arm, Experiment
from router.task_table import TaskTable


class RoutingError(ValueError):
    """A request names its adapter in a way we cannot serve."""


class UnknownModelError(RoutingError):
    """`model` names neither the base model, a task nor an adapter."""

    def __init__(self, model: str, base_name: str) -> None:
        super().__init__(
            f"model {model!r} is neither the base model {base_name!r}, a task nor a loaded adapter; "
            "list them with GET /v1/models and GET /v1/tasks"
        )
        self.model = model


class RoutingConflictError(RoutingError):
    """`X-Task-Id` and `model` name different things."""


class AccessDeniedError(RoutingError):
    """The caller's key does not allow that task or adapter (whether or not it exists)."""

    def __init__(self, kind: str, name: str) -> None:
        super().__init__(f"this API key may not use {kind} {name!r}; ask an administrator to grant it")
        self.kind = kind
        self.name = name


class NamePolicy(Protocol):
    """What an API key may use; the router asks it before revealing whether a name exists."""

    def allows_task(self, task: str) -> bool: ...

    def allows_adapter(self, adapter: str) -> bool: ...


class ExperimentSource(Protocol):
    """Running experiments by task, and the (sticky) arm of a unit; the server's experiment
    store implements it."""

    def experiment_on(self, task: str) -> Experiment | None: ...

    def assign(self, experiment: Experiment, user_key: str, request_id: str) -> Arm: ...


class AllowAll:
    def allows_task(self, task: str) -> bool:
        return True

    def allows_adapter(self, adapter: str) -> bool:
        return True


@dataclass(frozen=True)
class RouteDecision:
    adapter: str | None  # None = the base model alone
    task: str | None = None  # the task the request came through, if any
    ab_arm: bool = False  # the adapter was drawn from A/B arms
    experiment: str | None = None  # the running experiment that chose the adapter, if any
    arm: str | None = None  # that experiment's arm


class RequestRouter:
    def __init__(
        self,
        tasks: TaskTable,
        adapter_names: Callable[[], set[str]],
        base_name: str,
        experiments: ExperimentSource | None = None,
    ) -> None:
        self.tasks = tasks
        self.adapter_names = adapter_names  # read per request: adapters load and unload at run time
        self.base_name = base_name
        self.experiments = experiments

    def route(
        self,
        model: str | None,
        task_header: str | None,
        user_key: str,
        policy: NamePolicy | None = None,
        request_id: str | None = None,
    ) -> RouteDecision:
        """`user_key` fixes the A/B arm (the `user` field, `X-User-Id`, else the request id). A
        running experiment on the task takes precedence over the task table's arms."""
        policy = policy or AllowAll()
        model = model or None
        request_id = request_id or user_key
        if task_header is not None:
            if policy.allows_task(task_header) and (held := self._experiment_on(task_header)):
                if model is not None and model not in (self.base_name, task_header):
                    raise RoutingConflictError(
                        f"X-Task-Id {task_header!r} is in experiment {held.name!r}, which picks the adapter, but "
                        f"model is {model!r}; send model {self.base_name!r} or {task_header!r} with the header"
                    )
                return self._through_experiment(held, task_header, user_key, request_id)
            return self._route_task_header(task_header, model, user_key, policy)
        if model is None or model == self.base_name:
            return RouteDecision(adapter=None)
        may_task = policy.allows_task(model)
        may_adapter = policy.allows_adapter(model)
        if not (may_task or may_adapter):
            raise AccessDeniedError("model", model)
        # The task table wins over a same-named adapter: it is the operator's explicit routing
        # (A/B arms, a pinned version) and the adapter stays reachable through its own task.
        if may_task and (held := self._experiment_on(model)):
            return self._through_experiment(held, model, user_key, request_id)
        if may_task and model in self.tasks:
            return self._through_task(model, user_key)
        if may_adapter and model in self.adapter_names():
            return RouteDecision(adapter=model)
        raise UnknownModelError(model, self.base_name)

    def _route_task_header(self, task: str, model: str | None, user_key: str, policy: NamePolicy) -> RouteDecision:
        if not policy.allows_task(task):
            raise AccessDeniedError("task", task)
        route = self.tasks.get(task)
        # OpenAI clients always send `model`; the base's name or the task's own name or adapter
        # agree with the header, anything else is a contradiction we refuse rather than guess.
        if model is not None and model not in (self.base_name, task, *route.adapters):
            raise RoutingConflictError(
                f"X-Task-Id {task!r} routes to adapter(s) {', '.join(route.adapters)} but model is {model!r}; "
                f"send model {self.base_name!r} or {task!r} with the header, or drop the header"
            )
        if model in route.adapters:  # naming one arm of an A/B task pins that arm
            return RouteDecision(adapter=model, task=task, ab_arm=route.is_ab)
        return self._through_task(task, user_key)

    def _through_task(self, task: str, user_key: str) -> RouteDecision:
        route = self.tasks.get(task)
        return RouteDecision(adapter=choose_arm(task, route, user_key), task=task, ab_arm=route.is_ab)

    def _experiment_on(self, task: str) -> Experiment | None:
        return self.experiments.experiment_on(task) if self.experiments is not None else None

    def _through_experiment(self, experiment: Experiment, task: str, user_key: str, request_id: str) -> RouteDecision:
        arm = self.experiments.assign(experiment, user_key, request_id)  # type: ignore[union-attr]
        return RouteDecision(adapter=arm.adapter, task=task, ab_arm=True, experiment=experiment.name, arm=arm.name)
