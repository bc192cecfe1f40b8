"""Feedback joined to arms without a server: thumbs, labels and rewards land in the summary."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from server.experiment_runtime import UnknownFeedbackRequestError, build_experiments

EXPERIMENT = {"task": "qa", "control": "a",
              "arms": [{"name": "a", "adapter": "qa-a", "weight": 1}, {"name": "b", "adapter": "qa-b", "weight": 1}]}


def test_thumbs_and_labels_are_counted_per_arm_and_compared_as_rates():
    experiments = build_experiments(None, {"exp": EXPERIMENT}, lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    thumbs = {"a": ["up", "down", "down", "down"], "b": ["up", "up", "up", "down"]}
    for arm, votes in thumbs.items():
        for i, vote in enumerate(votes):
            experiments.index.remember(f"{arm}-{i}", "exp", arm)
            experiments.feedback(f"{arm}-{i}", None, None, vote)
    experiments.index.remember("labelled", "exp", "b")
    assert experiments.feedback("labelled", None, "helpful", None)["duplicate"] is False
    assert experiments.feedback("labelled", None, "helpful", None)["duplicate"] is True
    summary = experiments.summary("exp")
    by_arm = {arm["name"]: arm for arm in summary["arms"]}
    assert by_arm["a"]["thumbs_up_rate"] == 0.25 and by_arm["b"]["thumbs_up_rate"] == 0.75
    assert by_arm["b"]["labels"] == {"helpful": 1} and by_arm["b"]["feedback_count"] == 5
    (rate,) = [c for c in summary["comparisons"] if c["metric"] == "thumbs_up_rate"]
    assert rate["diff"] == pytest.approx(0.5)
    with pytest.raises(UnknownFeedbackRequestError, match="'nobody'"):
        experiments.feedback("nobody", 1.0, None, None)


def test_an_experiment_routes_only_inside_its_window(tmp_path):
    experiments = build_experiments(str(tmp_path), {"later": {**EXPERIMENT, "start_at": 4_000_000_000}},
                                    lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    assert experiments.experiment_on("qa") is None and experiments.summary("later")["routing"] is False
    experiments.put("later", {**EXPERIMENT, "stop_at": 4_000_000_000})
    assert experiments.experiment_on("qa").name == "later"
    experiments.store.close()
    reopened = build_experiments(str(tmp_path), {}, lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    assert reopened.get("later").stop_at == 4_000_000_000  # the window survives a restart
