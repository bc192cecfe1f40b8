import pytest

from router.experiments import assign, experiment_from_json, with_buckets
from router.request_router import RequestRouter, RoutingConflictError
from router.task_table import TaskRoute, TaskTable

BASE = "base-model"


class Experiments:
    """The ExperimentSource protocol over one experiment, without persistence."""

    def __init__(self, experiment):
        self.experiment = experiment
        self.assigned = []

    def experiment_on(self, task):
        return self.experiment if self.experiment.running and self.experiment.task == task else None

    def assign(self, experiment, user_key, request_id):
        key = request_id if experiment.unit == "request" else user_key
        self.assigned.append(key)
        return assign(experiment, key)


def make_router(status="running", unit="user"):
    experiment = with_buckets(experiment_from_json("exp", {
        "task": "qa", "control": "a", "unit": unit, "status": status,
        "arms": [{"name": "a", "adapter": "qa-a", "weight": 1}, {"name": "b", "adapter": "qa-b", "weight": 1}],
    }))
    source = Experiments(experiment)
    tasks = TaskTable({"qa": TaskRoute.single("qa-plain")})
    return RequestRouter(tasks, lambda: {"qa-plain", "qa-a", "qa-b"}, BASE, source), source


def test_running_experiment_takes_precedence_over_the_task_table():
    router, _ = make_router()
    for decision in (router.route(BASE, "qa", "user-1", request_id="r1"), router.route("qa", None, "user-1", request_id="r1")):
        assert decision.experiment == "exp" and decision.arm in ("a", "b")
        assert decision.adapter == {"a": "qa-a", "b": "qa-b"}[decision.arm]
    arms = {router.route(BASE, "qa", f"user-{i}").arm for i in range(50)}
    assert arms == {"a", "b"}


def test_stopped_experiment_leaves_the_task_table_in_charge():
    router, _ = make_router(status="stopped")
    decision = router.route(BASE, "qa", "user-1")
    assert decision.adapter == "qa-plain" and decision.experiment is None


def test_unit_request_assigns_by_request_id():
    router, source = make_router(unit="request")
    router.route(BASE, "qa", "user-1", request_id="req-9")
    assert source.assigned == ["req-9"]


def test_model_naming_another_adapter_contradicts_the_experiment():
    router, source = make_router()
    with pytest.raises(RoutingConflictError, match="experiment 'exp'"):
        router.route("qa-a", "qa", "user-1")
    assert source.assigned == []  # refused before any unit was assigned
