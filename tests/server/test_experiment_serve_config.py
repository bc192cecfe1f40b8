"""Experiments from the serve config file: parsed into the settings and applied at startup."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from router.experiments import assign
from server.cli import build_parser
from server.experiment_runtime import ExperimentAdapterError, build_experiments
from server.serve_command import settings_from_args

EXPERIMENT = {"task": "qa", "control": "a",
              "arms": [{"name": "a", "adapter": "qa-a", "weight": 1}, {"name": "b", "adapter": "qa-b", "weight": 1}]}


def test_config_file_sets_state_dir_and_experiments(tmp_path):
    config = tmp_path / "serve.yaml"
    config.write_text(
        "state_dir: state\n"
        "experiments:\n  qa-v2: {task: qa, control: a, arms: [{name: a, adapter: qa-a, weight: 1}, "
        "{name: b, adapter: qa-b, weight: 1}]}\n"
    )
    settings = settings_from_args(build_parser().parse_args(["serve", "--config", str(config)]))
    assert settings.state_dir == str(tmp_path / "state")  # relative to the config file
    assert settings.experiments == {"qa-v2": EXPERIMENT}
    flagged = settings_from_args(build_parser().parse_args(["serve", "--config", str(config), "--state-dir", "/srv/x"]))
    assert flagged.state_dir == "/srv/x"


def test_configured_experiment_replaces_the_stored_definition_and_keeps_its_counters(tmp_path):
    first = build_experiments(str(tmp_path), {"qa-v2": EXPERIMENT}, lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    arm = first.assign(first.experiment_on("qa"), "user-1", "r1")
    first.store.close()
    # Nearly all of that arm's weight goes: the bucket table now sends user-1 elsewhere...
    reweighted = {**EXPERIMENT, "arms": [{**a, "weight": 1e-4 if a["name"] == arm.name else 1} for a in EXPERIMENT["arms"]]}
    again = build_experiments(str(tmp_path), {"qa-v2": reweighted}, lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    assert sorted(a.weight for a in again.get("qa-v2").arms) == [1e-4, 1.0]
    assert assign(again.get("qa-v2"), "user-1").name != arm.name
    # ...but the unit keeps the arm it was first given.
    assert again.assign(again.experiment_on("qa"), "user-1", "r2").name == arm.name  # remembered across the restart
    assert again.summary("qa-v2")["arms"][[a.name for a in again.get("qa-v2").arms].index(arm.name)]["assignments"] == 1
    again.store.close()


def test_configured_experiment_on_a_missing_adapter_stops_startup(tmp_path):
    with pytest.raises(ExperimentAdapterError, match="'qa-b'"):
        build_experiments(None, {"qa-v2": EXPERIMENT}, lambda: {"qa-a"}, CollectorRegistry())


def test_an_unusable_state_file_still_assigns_from_the_bucket_table(tmp_path):
    experiments = build_experiments(str(tmp_path), {"qa-v2": EXPERIMENT}, lambda: {"qa-a", "qa-b"}, CollectorRegistry())
    experiments.store.close()  # every read and write now raises sqlite3.ProgrammingError
    experiment = experiments.experiment_on("qa")
    assert experiments.assign(experiment, "user-1", "r1") == assign(experiment, "user-1")
