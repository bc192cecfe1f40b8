import pytest

from router.ab_test import choose_arm
from router.task_table import (
    TaskRoute,
    TaskTable,
    TaskTableError,
    UnknownTaskError,
    parse_task_spec,
    route_from_json,
)


def test_put_get_remove_roundtrip():
    table = TaskTable()
    table.put("summarize", TaskRoute.single("sum-v1"))
    assert table.get("summarize").adapters == ["sum-v1"]
    assert "summarize" in table
    table.put("summarize", TaskRoute.single("sum-v2"))  # re-pointing a task replaces its route
    assert table.get("summarize").adapters == ["sum-v2"]
    assert table.remove("summarize").adapters == ["sum-v2"]
    assert "summarize" not in table


def test_unknown_task_error_names_task_and_fix():
    with pytest.raises(UnknownTaskError, match=r"'nope'.*PUT /v1/tasks/nope"):
        TaskTable().get("nope")
    with pytest.raises(UnknownTaskError):
        TaskTable().remove("nope")


@pytest.mark.parametrize("name", ["", "../x", "a b", "-lead", "x" * 129, "ünï"])
def test_bad_names_refused(name):
    with pytest.raises(TaskTableError, match="invalid"):
        TaskTable().put(name, TaskRoute.single("ok"))
    with pytest.raises(TaskTableError, match="invalid"):
        TaskRoute.single(name)


def test_parse_task_spec_single_and_arms():
    assert parse_task_spec("qa=qa-lora") == ("qa", TaskRoute.single("qa-lora"))
    task, route = parse_task_spec("qa=a:0.9,b:0.1")
    assert task == "qa" and dict(route.arms) == {"a": 0.9, "b": 0.1} and route.is_ab
    for bad in ("qa", "=x", "qa=", "qa=a:x,b:1", "qa=a:0,b:1", "qa=a:-1,b:2"):
        with pytest.raises(TaskTableError):
            parse_task_spec(bad)


def test_route_from_json_shapes():
    assert route_from_json({"adapter": "x"}).to_json() == {"adapter": "x"}
    assert route_from_json({"arms": {"b": 1, "a": 3}}).to_json() == {"arms": {"a": 3.0, "b": 1.0}}
    for bad in ({}, {"adapter": "x", "arms": {"y": 1}}, {"arms": []}, {"arms": {}}, 3):
        with pytest.raises(TaskTableError):
            route_from_json(bad)


def test_tasks_using_adapter():
    table = TaskTable({"a": TaskRoute.single("x"), "b": TaskRoute.weighted({"x": 1, "y": 1}), "c": TaskRoute.single("y")})
    assert table.tasks_using("x") == ["a", "b"]


def test_ab_choice_is_deterministic_per_user_and_follows_weights():
    route = TaskRoute.weighted({"a": 0.8, "b": 0.2})
    users = [f"user-{i}" for i in range(4000)]
    first = [choose_arm("task", route, user) for user in users]
    assert first == [choose_arm("task", route, user) for user in users]  # same user, same arm
    share_a = first.count("a") / len(first)
    assert 0.76 < share_a < 0.84  # 4000 draws: sd ~0.006
    # The task salts the hash: arms in two experiments are not the same function of the user.
    other = [choose_arm("other", route, user) for user in users]
    assert other != first


def test_single_route_ignores_user():
    assert {choose_arm("t", TaskRoute.single("only"), f"u{i}") for i in range(50)} == {"only"}
