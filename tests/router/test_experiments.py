import math

import pytest

from router.experiments import (
    BUCKETS,
    ExperimentError,
    assign,
    experiment_from_json,
    mirrors_to_shadow,
    with_buckets,
)

KEYS = [f"user-{i}" for i in range(10_000)]


def make(weights, name="exp", shadow=None):
    arms = [{"name": f"arm{i}", "adapter": f"adapter{i}", "weight": w} for i, w in enumerate(weights)]
    return experiment_from_json(name, {"task": "qa", "arms": arms, "control": "arm0", "shadow": shadow})


def test_assignment_is_deterministic_per_unit_key():
    first = with_buckets(make([1, 1]))
    again = with_buckets(make([1, 1]))
    assert [assign(first, key).name for key in KEYS] == [assign(again, key).name for key in KEYS]


def test_experiment_name_salts_the_assignment():
    a, b = with_buckets(make([1, 1], name="one")), with_buckets(make([1, 1], name="two"))
    same = sum(assign(a, key).name == assign(b, key).name for key in KEYS)
    assert 4_700 < same < 5_300  # independent: about half agree


@pytest.mark.parametrize("weights", [[1, 1], [0.9, 0.1], [2, 1, 1], [0.05, 0.95]])
def test_weights_are_respected_within_binomial_bounds_over_10000_keys(weights):
    experiment = with_buckets(make(weights))
    counts = {arm.name: 0 for arm in experiment.arms}
    for key in KEYS:
        counts[assign(experiment, key).name] += 1
    for arm, share in experiment.shares().items():
        expected = share * len(KEYS)
        sd = math.sqrt(len(KEYS) * share * (1 - share))
        assert abs(counts[arm] - expected) <= 4 * sd, (arm, counts[arm], expected)


def test_reweighting_moves_only_the_keys_it_must():
    before = with_buckets(make([1, 1]))
    after = with_buckets(make([7, 3]), previous=before)
    moved = [(assign(before, key).name, assign(after, key).name) for key in KEYS]
    changed = [pair for pair in moved if pair[0] != pair[1]]
    assert all(pair == ("arm1", "arm0") for pair in changed)  # only the shrinking arm gives keys away
    assert all(b == "arm1" for b, a in moved if a == "arm1") and all(a == "arm0" for b, a in moved if b == "arm0")
    # Exactly 20% of the buckets changed hands; keys follow within binomial noise.
    assert sum(x != y for x, y in zip(before.buckets, after.buckets)) == BUCKETS // 5
    assert abs(len(changed) - 2_000) <= 4 * math.sqrt(10_000 * 0.2 * 0.8)


def test_adding_an_arm_takes_buckets_proportionally_from_the_others():
    before = with_buckets(make([1, 1]))
    after = with_buckets(make([1, 1, 1]), previous=before)
    moved = [(assign(before, key).name, assign(after, key).name) for key in KEYS]
    assert all(a == b or a == "arm2" for b, a in moved)  # nobody moves between the old arms
    assert sum(x != y for x, y in zip(before.buckets, after.buckets)) == after.buckets.count(2) in (3_333, 3_334)
    assert abs(sum(a == "arm2" for _, a in moved) - 10_000 / 3) <= 4 * math.sqrt(10_000 * 2 / 9)


def test_shadow_rate_mirrors_about_that_share_of_requests():
    experiment = make([1, 1], shadow={"adapter": "candidate", "rate": 0.25})
    mirrored = sum(mirrors_to_shadow(experiment, key) for key in KEYS)
    assert abs(mirrored - 2_500) <= 4 * math.sqrt(10_000 * 0.25 * 0.75)
    assert not mirrors_to_shadow(make([1, 1]), "any")


@pytest.mark.parametrize(
    "body, message",
    [
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x", "weight": 0}, {"name": "b", "adapter": "y", "weight": 0}]},
         "must sum to a positive number"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x", "weight": 1e308}, {"name": "b", "adapter": "y", "weight": 1e308}]},
         "and a finite one"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x", "weight": -1}]}, "weights must be numbers >= 0"),
        ({"task": "qa", "arms": []}, "non-empty list"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "control": "z"}, "control 'z' is not one of"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}, {"name": "a", "adapter": "y"}]}, "unique"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "unit": "tenant"}, "unit 'tenant'"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "shadow": {"adapter": "s", "rate": 1.5}}, "rate"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "colour": "red"}, "unknown field"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x@latest"}]}, "NAME@VERSION"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x@0"}]}, "NAME@VERSION"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "shadow": {"adapter": "s@", "rate": 1}}, "NAME@VERSION"),
        ({"task": "qa", "arms": [{"name": "a", "adapter": 7}]}, "must be a string"),
    ],
)
def test_malformed_experiments_are_refused_with_the_reason(body, message):
    with pytest.raises(ExperimentError, match=message):
        experiment_from_json("exp", body)


def test_arms_and_shadow_may_pin_versions_and_the_pins_are_listed_once():
    experiment = experiment_from_json("exp", {
        "task": "qa", "arms": [{"name": "a", "adapter": "x@1"}, {"name": "b", "adapter": "x"}, {"name": "c", "adapter": "y@2"}],
        "shadow": {"adapter": "x@1", "rate": 0.5},
    })
    assert experiment.adapters == ["x@1", "x", "y@2", "x@1"]
    assert experiment.pinned_versions == ["x@1", "y@2"]
    assert experiment.to_json()["arms"][0]["adapter"] == "x@1"  # stored and shown as written


def test_start_and_stop_times_bound_when_the_experiment_routes():
    body = {"task": "qa", "arms": [{"name": "a", "adapter": "x"}], "start_at": 100, "stop_at": 200}
    experiment = experiment_from_json("exp", body)
    assert [experiment.routes_at(t) for t in (99.9, 100, 199.9, 200)] == [False, True, True, False]
    assert not experiment_from_json("exp", {**body, "status": "stopped"}).routes_at(150)
    with pytest.raises(ExperimentError, match="stop_at .* must come after start_at"):
        experiment_from_json("exp", {**body, "stop_at": 50})
    with pytest.raises(ExperimentError, match="unix time"):
        experiment_from_json("exp", {**body, "start_at": "tomorrow"})
