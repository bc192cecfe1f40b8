"""Task mixing, token-budget batching and their checkpointable state."""

import math

import pytest

from training.batching import BatchPlanner, pack_by_length
from training.sampling import SamplingError, TaskSampler, mixing_probabilities


def test_mixing_strategies():
    sizes = [100, 400, 10000]
    assert mixing_probabilities(sizes, "proportional") == pytest.approx([n / 10500 for n in sizes])
    tempered = [n ** 0.5 for n in sizes]
    assert mixing_probabilities(sizes, "temperature", temperature=2.0) == pytest.approx([t / sum(tempered) for t in tempered])
    assert mixing_probabilities(sizes, "cap", cap=400) == pytest.approx([100 / 900, 400 / 900, 400 / 900])
    assert mixing_probabilities(sizes, "weights", weights=[1, 1, 2]) == pytest.approx([0.25, 0.25, 0.5])
    with pytest.raises(SamplingError, match="weight"):
        mixing_probabilities(sizes, "weights", weights=[1, None, 2])
    with pytest.raises(SamplingError, match="cap"):
        mixing_probabilities(sizes, "cap")


def test_sampler_realised_mix_follows_probabilities_and_passes_cover_every_example():
    sampler = TaskSampler([5, 20], [0.3, 0.7], seed=0)
    draws = [sampler.draw() for _ in range(4000)]
    assert math.isclose(sampler.realised_mix()[0], 0.3, abs_tol=0.03)
    first_task0 = [i for t, i in draws if t == 0][:5]
    assert sorted(first_task0) == list(range(5))  # one full pass before any repeat


def test_pack_by_length_respects_the_budget_and_groups_similar_lengths():
    lengths = [5, 50, 7, 48, 6, 52, 120]
    groups = pack_by_length(lengths, batch_tokens=100)
    assert sorted(i for g in groups for i in g) == list(range(len(lengths)))
    for group in groups:
        longest = max(lengths[i] for i in group)
        assert len(group) * longest <= 100 or len(group) == 1
    assert {frozenset(g) for g in groups} >= {frozenset({0, 2, 4}), frozenset({6})}


def test_planner_state_round_trip_continues_identically():
    lengths = [[3 + i % 7 for i in range(30)], [10 + i % 5 for i in range(12)]]

    def planner():
        return BatchPlanner(TaskSampler([30, 12], [0.5, 0.5], seed=1), lengths, batch_tokens=40, accumulation=2)

    first = planner()
    for _ in range(3):
        first.next_step()
    state = first.state_dict()
    expected = [first.next_step() for _ in range(4)]
    second = planner()
    second.load_state_dict(state)
    assert [second.next_step() for _ in range(4)] == expected


def test_steps_carry_the_sampled_mix_even_when_task_lengths_differ():
    lengths = [[4 + i % 3 for i in range(40)], [30 + i % 5 for i in range(40)]]  # short vs long task
    planner = BatchPlanner(TaskSampler([40, 40], [0.5, 0.5], seed=3), lengths, batch_tokens=128, accumulation=2)
    steps = [planner.next_step() for _ in range(30)]
    mixed = sum(1 for step in steps if len({task for batch in step for task, _ in batch}) == 2)
    assert mixed >= 27  # a length-sorted pool would put nearly every step on one task
    for step in steps:
        assert 1 <= len(step) <= 2
        for batch in step:
            longest = max(lengths[task][index] for task, index in batch)
            assert len(batch) * longest <= 128 or len(batch) == 1
