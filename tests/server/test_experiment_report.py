"""The experiment store on disk and `loraplex experiment report` from it."""

from __future__ import annotations

from router.experiments import experiment_from_json, with_buckets
from server.cli import main
from server.experiment_store import ExperimentStore
from server.experiment_summary import summarize


def make_store(folder):
    store = ExperimentStore(folder)
    experiment = with_buckets(experiment_from_json("exp", {
        "task": "qa", "control": "a",
        "arms": [{"name": "a", "adapter": "qa-a", "weight": 1}, {"name": "b", "adapter": "qa-b", "weight": 1}],
    }))
    store.put(experiment)
    rewards = {"a": [0.0, 1.0, 1.0, 0.0, 1.0, 0.0], "b": [1.0, 1.0, 1.0, 0.0, 1.0, 1.0]}
    for step in range(len(rewards["a"])):
        for arm, values in rewards.items():
            reward = values[step]
            store.add("exp", arm, {"requests": 1, "feedback_count": 1, "reward_n": 1, "reward_sum": reward,
                                   "reward_sumsq": reward * reward}, latency={"total": 40, "ttft": 20})
        store.snapshot("exp", 1_700_000_000.0 + 60 * step)
    return store, experiment, rewards


def test_store_keeps_definitions_and_counters_across_reopening(tmp_path):
    store, experiment, rewards = make_store(tmp_path)
    store.remember_unit("exp", "unit-1", "b", experiment.shares())
    store.close()
    reopened = ExperimentStore(tmp_path)
    (loaded,) = reopened.load_all()
    assert loaded == experiment and loaded.buckets == experiment.buckets
    assert reopened.remembered_arm("exp", "unit-1") == "b"
    counters = reopened.counters("exp")
    assert counters["b"]["reward_sum"] == sum(rewards["b"]) and counters["a"]["expected_assignments"] == 0.5
    assert len(reopened.history("exp")) == len(rewards["a"])
    reopened.delete("exp")
    assert reopened.load_all() == [] and reopened.counters("exp") == {} and reopened.history("exp") == []
    assert reopened.remembered_arm("exp", "unit-1") is None


def test_report_from_the_state_folder_writes_markdown_and_png(tmp_path, capsys):
    store, experiment, rewards = make_store(tmp_path / "state")
    expected = summarize(experiment, store.counters("exp"), store.latency_bins("exp"), store.labels("exp"))
    store.close()
    out = tmp_path / "report"
    assert main(["experiment", "report", "exp", "--state-dir", str(tmp_path / "state"), "--out", str(out)]) == 0
    markdown = (out / "report.md").read_text()
    mean_b = sum(rewards["b"]) / len(rewards["b"])
    assert "| b | qa-b | 1 | 0 | 6 | 0 |" in markdown and f"| {mean_b:.4g} |" in markdown
    (comparison,) = expected["comparisons"]
    assert f"| b vs a | reward | {comparison['diff']:.4g} |" in markdown
    assert (out / "reward_over_time.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*.tmp"))  # staging files renamed into place


def test_report_names_what_is_missing(tmp_path, capsys):
    assert main(["experiment", "report", "exp", "--state-dir", str(tmp_path)]) == 2
    assert "holds no experiments.sqlite" in capsys.readouterr().err
    make_store(tmp_path)[0].close()
    assert main(["experiment", "report", "other", "--state-dir", str(tmp_path)]) == 2
    assert "it holds ['exp']" in capsys.readouterr().err
    assert main(["experiment", "report", "exp", "--server", "http://127.0.0.1:9"]) == 2
    assert "cannot reach --server" in capsys.readouterr().err
