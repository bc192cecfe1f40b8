import os

import pytest

from router.path_guard import AdapterPathError, AdapterPathForbiddenError, AdapterPathNotFoundError, PathGuard
from router.request_router import (
    AccessDeniedError,
    RequestRouter,
    RouteDecision,
    RoutingConflictError,
    UnknownModelError,
)
from router.task_table import TaskRoute, TaskTable, UnknownTaskError

BASE = "base-model"


class Policy:
    def __init__(self, tasks=(), adapters=()):
        self.tasks, self.adapters = set(tasks), set(adapters)

    def allows_task(self, task):
        return task in self.tasks

    def allows_adapter(self, adapter):
        return adapter in self.adapters


@pytest.fixture
def router():
    tasks = TaskTable({"qa": TaskRoute.single("qa-lora"), "exp": TaskRoute.weighted({"arm-a": 1, "arm-b": 1})})
    adapters = {"qa-lora", "arm-a", "arm-b", "solo"}
    return RequestRouter(tasks, lambda: adapters, BASE)


def test_base_name_or_empty_model_means_no_adapter(router):
    assert router.route(BASE, None, "u") == RouteDecision(adapter=None)
    assert router.route("", None, "u") == RouteDecision(adapter=None)


def test_model_names_adapter_or_task(router):
    assert router.route("solo", None, "u") == RouteDecision(adapter="solo")
    assert router.route("qa", None, "u") == RouteDecision(adapter="qa-lora", task="qa")


def test_task_header_routes_and_agreeing_models_accepted(router):
    for model in (BASE, "qa", "qa-lora", None):
        assert router.route(model, "qa", "u") == RouteDecision(adapter="qa-lora", task="qa")


def test_task_header_and_disagreeing_model_conflict(router):
    with pytest.raises(RoutingConflictError, match=r"'qa'.*'solo'"):
        router.route("solo", "qa", "u")


def test_unknown_names_are_404_errors(router):
    with pytest.raises(UnknownTaskError):
        router.route(BASE, "nope", "u")
    with pytest.raises(UnknownModelError, match="GET /v1/models"):
        router.route("nope", None, "u")


def test_ab_task_picks_arm_per_user_and_model_can_pin_an_arm(router):
    arms = {router.route(BASE, "exp", f"user{i}").adapter for i in range(64)}
    assert arms == {"arm-a", "arm-b"}
    assert router.route(BASE, "exp", "user7") == router.route(BASE, "exp", "user7")
    assert router.route("arm-b", "exp", "user7").adapter == "arm-b"


def test_policy_refuses_before_revealing_existence(router):
    policy = Policy(tasks={"qa"}, adapters={"solo"})
    assert router.route("solo", None, "u", policy).adapter == "solo"
    assert router.route(BASE, "qa", "u", policy).adapter == "qa-lora"
    # An existing name and a missing one get the same refusal.
    for model in ("arm-a", "does-not-exist"):
        with pytest.raises(AccessDeniedError) as caught:
            router.route(model, None, "u", policy)
        assert "may not use model" in str(caught.value)
    for task in ("exp", "no-such-task"):
        with pytest.raises(AccessDeniedError, match="may not use task"):
            router.route(BASE, task, "u", policy)


def test_adapters_read_live(router):
    names = {"a"}
    live = RequestRouter(TaskTable(), lambda: names, BASE)
    with pytest.raises(UnknownModelError):
        live.route("b", None, "u")
    names.add("b")
    assert live.route("b", None, "u").adapter == "b"


# Path guard: client-supplied adapter paths stay inside the adapter roots.


@pytest.fixture
def roots(tmp_path):
    root = tmp_path / "adapters"
    (root / "good").mkdir(parents=True)
    (root / "good" / "adapter_config.json").write_text("{}")
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "adapter_config.json").write_text("{}")
    return root, outside


def test_path_inside_root_resolves(roots):
    root, _ = roots
    guard = PathGuard([root])
    assert guard.resolve(str(root / "good")) == (root / "good").resolve()
    assert guard.resolve("good") == (root / "good").resolve()  # relative to a root


def test_dotdot_refused_even_when_it_lands_inside(roots):
    root, _ = roots
    guard = PathGuard([root])
    for raw in (f"{root}/good/../good", "../secret", "good/../../secret"):
        with pytest.raises(AdapterPathError, match=r"'\.\.'"):
            guard.resolve(raw)


def test_path_outside_roots_forbidden(roots):
    root, outside = roots
    guard = PathGuard([root])
    with pytest.raises(AdapterPathForbiddenError, match="outside the adapter roots"):
        guard.resolve(str(outside))
    with pytest.raises(AdapterPathForbiddenError):  # missing or not, an outside path is refused alike
        guard.resolve("/definitely/not/here")


def test_symlink_escape_refused(roots):
    root, outside = roots
    os.symlink(outside, root / "sneaky")
    guard = PathGuard([root])
    with pytest.raises(AdapterPathForbiddenError, match="symlink"):
        guard.resolve(str(root / "sneaky"))
    (root / "mixed").mkdir()
    os.symlink(outside / "adapter_config.json", root / "mixed" / "adapter_config.json")
    with pytest.raises(AdapterPathForbiddenError, match="adapter_config.json"):
        guard.resolve("mixed")


def test_missing_and_malformed_paths(roots):
    root, _ = roots
    guard = PathGuard([root])
    with pytest.raises(AdapterPathNotFoundError):
        guard.resolve("absent")
    with pytest.raises(AdapterPathError):
        guard.resolve("")
    with pytest.raises(AdapterPathError, match="NUL"):
        guard.resolve("good\x00")
    (root / "file.txt").write_text("x")
    with pytest.raises(AdapterPathError, match="not a folder"):
        guard.resolve("file.txt")


def test_no_roots_disables_http_loading(roots):
    root, _ = roots
    with pytest.raises(AdapterPathForbiddenError, match="--adapter-root"):
        PathGuard([]).resolve(str(root / "good"))
