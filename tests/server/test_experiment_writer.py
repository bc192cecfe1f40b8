"""The experiment store's write-behind: per-request writes never wait for a commit, commit in
batches and in order, a failing write loses only itself, and readers see what was sent before."""

from __future__ import annotations

import threading

from prometheus_client import CollectorRegistry

from router.experiments import experiment_from_json, with_buckets
from server.experiment_runtime import build_experiments
from server.experiment_store import ExperimentStore

EXPERIMENT = {"task": "qa", "control": "a",
              "arms": [{"name": "a", "adapter": "qa-a", "weight": 1}, {"name": "b", "adapter": "qa-b", "weight": 1}]}


def in_thread(action) -> threading.Thread:
    thread = threading.Thread(target=action, daemon=True)
    thread.start()
    return thread


def test_writes_return_while_a_commit_is_stalled_and_then_land_in_few_commits(tmp_path):
    store = ExperimentStore(tmp_path)
    commits_before = store.writer.commits
    with store._lock:  # a commit stuck on a slow disk holds the write connection
        writer = in_thread(lambda: [store.add("exp", "a", {"requests": 1}) for _ in range(200)])
        writer.join(60)
        assert not writer.is_alive()  # all 200 were queued without waiting for the disk
    assert store.counters("exp") == {"a": {"requests": 200.0}}  # a read waits for the queue
    assert store.writer.commits - commits_before <= 3  # the backlog went in one or two transactions, not 200
    store.close()


def test_a_failing_write_loses_only_itself(tmp_path):
    store = ExperimentStore(tmp_path)
    with store._lock:  # queue all three behind one stalled commit, so they share a batch
        store.add("exp", "a", {"requests": 1})
        store.writer.write([("INSERT INTO no_such_table VALUES (1)", ())])
        store.add("exp", "a", {"requests": 1})
    assert store.counters("exp") == {"a": {"requests": 2.0}}
    assert store.writer.failed_writes == 1
    store.close()


def test_a_queued_unit_is_remembered_before_its_commit_and_counted_once(tmp_path):
    store = ExperimentStore(tmp_path)
    shares = {"a": 0.5, "b": 0.5}
    with store._lock:
        store.remember_unit("exp", "unit-1", "b", shares)
        assert store.remembered_arm("exp", "unit-1") == "b"  # not committed yet, already known
    assert store.remembered_arm("exp", "unit-1") == "b"
    assert store.counters("exp")["b"]["assignments"] == 1.0
    store.close()


def test_a_delete_lands_after_the_writes_queued_before_it(tmp_path):
    store = ExperimentStore(tmp_path)
    experiment = with_buckets(experiment_from_json("exp", EXPERIMENT))
    store.put(experiment)
    with store._lock:
        for _ in range(50):
            store.add("exp", "a", {"requests": 1})
        deleting = in_thread(lambda: store.delete("exp"))
    deleting.join(60)
    assert not deleting.is_alive()
    assert store.counters("exp") == {} and store.load_all() == []  # no counter outlived its experiment
    store.close()


def test_close_commits_what_is_queued(tmp_path):
    store = ExperimentStore(tmp_path)
    with store._lock:
        for _ in range(30):
            store.add("exp", "b", {"requests": 1, "reward_sum": 0.5})
    store.snapshot("exp", 1.0)
    store.close()
    reopened = ExperimentStore(tmp_path)
    assert reopened.counters("exp") == {"b": {"requests": 30.0, "reward_sum": 15.0}}
    assert reopened.history("exp") == [(1.0, {"b": {"requests": 30.0, "reward_sum": 15.0}})]  # after the adds
    reopened.close()


def test_the_writer_queue_and_its_losses_are_prometheus_gauges():
    registry = CollectorRegistry()
    experiments = build_experiments(None, {"exp": EXPERIMENT}, lambda: {"qa-a", "qa-b"}, registry)
    experiments.store.writer.write([("INSERT INTO no_such_table VALUES (1)", ())])
    experiments.store.flush()
    assert registry.get_sample_value("loraplex_experiment_writes_failed") == 1.0
    assert registry.get_sample_value("loraplex_experiment_writes_queued") == 0.0
    experiments.store.close()
